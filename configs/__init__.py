"""ml_collections training configs (`python -m rdpo_jax.train --config=configs/NAME.py`); arrive with the trainer."""
