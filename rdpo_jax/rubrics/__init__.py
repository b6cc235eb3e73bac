"""Rubrics: judges and what they share, rubric generators, reward aggregation and pair miners.

  judge      the judge interface: Item, Verdict, the Judge protocol, JudgeOutputError
  prompt     the rubric prompt every model judge uses, and its version
  parse      strict parsing of a model judge's reply (the JSON object, the verdict)
  verifier   the deterministic verifier judge (machine-checkable criteria) and its word splitting
  http       a judge behind an OpenAI-compatible endpoint (client, verdict cache)
  local      a local Flax model as judge
  factory    make_judge: a judge by name (verifier, openai, flax)
  generate   rubric generators (rule-based from ground truth, or a model at an endpoint)
  aggregate  one answer's reward from its criterion scores, with an essential gate
  mining     preference pairs from judged samples (the rubric miner and the outcome baseline)
"""
