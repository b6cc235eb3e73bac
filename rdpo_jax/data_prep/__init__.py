"""Offline dataset commands (`python -m rdpo_jax.data_prep.NAME`): rubric pool, sampling, judging, pair mining."""
