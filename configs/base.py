"""Every training option at its default (`rdpo_jax.defaults.train()`), for runs set wholly on the command line:

    python -m rdpo_jax.train --config=configs/base.py --config.model.path=… --config.data.train=… --workdir=DIR
"""

from rdpo_jax import defaults


def get_config():
    return defaults.train()
