"""Offline dataset commands (`python -m data_prep.NAME`): rubric pool, sampling, judging, pair mining."""
