"""Experiment configs, loaded by path: `python -m rdpo_jax.train --config=configs/NAME.py[:ARG]` (ml_collections).

Examples to copy and edit; every one starts from the defaults in `rdpo_jax.defaults`. A package so that the
tests can import them (`from configs import smoke`).
"""
