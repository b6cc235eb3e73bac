"""ml_collections training configs (`python -m rdpo_jax.train --config=rdpo_jax/configs/NAME.py`); arrive with the trainer."""
