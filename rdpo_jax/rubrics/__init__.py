"""Rubrics: aggregation of criterion scores, judges (verifier, OpenAI-compatible endpoint, local Flax model),
rubric generators and pair miners."""
