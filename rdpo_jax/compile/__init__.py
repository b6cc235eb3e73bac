"""Ahead-of-time compilation for TPU topologies: `python -m rdpo_jax.compile`."""
