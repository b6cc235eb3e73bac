"""Qwen3.5 through the commands, in the test process: `evaluate` (sampling, judging, the summary) and the
server's engine against transformers' `generate` on prompts built from records (chat template,
preprocessing, 3D positions, the DeltaNet layers' cache in prefill and decoding). A whole round — sample,
judge, make_pairs, ref_logps, train, export — runs on the MoE variant, whose decoder is this one with sparse
MLPs (tests/models/qwen3_5_moe/test_commands.py); the loop orchestrates these same commands
(tests/test_loop.py)."""

from rdpo_jax import evaluate
from rdpo_jax.rubrics.verifier import VerifierJudge
from tests import runs
from tests.models.qwen3_vl.test_commands import engine_equals_generate


def test_evaluate(qwen35_smoke_dir, tmp_path):
    runs.call("data_prep.build_rubrics", f"--input={runs.prompts_jsonl(tmp_path)}", f"--out={tmp_path}")
    metrics = evaluate.evaluate(f"{qwen35_smoke_dir}/model", f"{tmp_path}/pool", str(tmp_path / "eval"),
                                judge=VerifierJudge(), max_new_tokens=4, batch_size=4)
    assert metrics["prompts"] == 6 and metrics["unscorable"] == 0


def test_engine_decodes_as_transformers_generate(qwen35_smoke_dir):
    engine_equals_generate(qwen35_smoke_dir)
