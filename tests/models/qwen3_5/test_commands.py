"""Qwen3.5 through the commands, in the test process: a round (sample → judge → make_pairs → ref_logps →
train → export), `evaluate` of the trained run, and the server's engine against transformers' `generate` on
prompts built from records (chat template, preprocessing, 3D positions, the DeltaNet layers' cache in
prefill and decoding). The loop orchestrates these same commands (tests/test_loop.py runs it on LLaVA)."""

from rdpo_jax import evaluate
from rdpo_jax.rubrics.verifier import VerifierJudge
from tests.models.qwen3_vl.test_commands import engine_equals_generate, round_of_commands


def test_round_of_commands_and_evaluate(qwen35_smoke_dir, tmp_path):
    run = round_of_commands(qwen35_smoke_dir, tmp_path, "qwen3_5", "Qwen3_5ForConditionalGeneration")
    metrics = evaluate.evaluate(run, f"{tmp_path}/round/pool", str(tmp_path / "eval"), judge=VerifierJudge(),
                                max_new_tokens=4, batch_size=4)
    assert metrics["prompts"] == 6 and metrics["unscorable"] == 0


def test_engine_decodes_as_transformers_generate(qwen35_smoke_dir):
    engine_equals_generate(qwen35_smoke_dir)
