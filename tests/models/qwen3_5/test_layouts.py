"""Every pair layout runs through Qwen3.5's recurrent state as separate forwards would: the shared-prefix row
`[prompt][chosen][rejected]`, multi-answer rows `[prompt][a₁][a₂][a₃]` and two groups sharing a row give each
pair's log-likelihoods and the DPO loss's gradients of the concat layout, where every answer is its own plain
row `[prompt][answer]` (no branch reaches a DeltaNet layer there). DeltaNet chunks of 8 tokens put chunk
boundaries inside prompts, at their ends and inside answers. Float64, so that a wrong state shows as more
than rounding (in float32 these hidden states of 25–45 carry ~1e-5 of noise from the order of sums); the
concat rows themselves equal transformers' separate forwards in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rdpo_jax import logps, packing, train_step
from rdpo_jax.models import config as config_lib
from rdpo_jax.models import deltanet, hf
from tests import tiny_qwen as tq

PAIRS = [[(0, 1), (2, 1)], [(1, 0)], [(0, 2), (1, 2)]]  # per group: (chosen, rejected) answer indexes
PROMPTS, ANSWERS = [13, 6, 16], [[3, 9, 6], [10, 4], [5, 7, 2]]
SEQ = 48


def _groups(rng):
    ref = rng.normal(-20, 3, (2, 5))  # the five pairs' reference log-likelihoods
    starts = np.cumsum([0] + [len(p) for p in PAIRS])
    groups = [packing.Group(rng.integers(0, tq.IMAGE, P).tolist(), [rng.integers(0, tq.IMAGE, n).tolist() for n in A],
                            pairs, fields={"ref_chosen_logp": ref[0, a:b], "ref_rejected_logp": ref[1, a:b]})
              for P, A, pairs, a, b in zip(PROMPTS, ANSWERS, PAIRS, starts, starts[1:])]
    pairs = [packing.Group(g.prompt, [g.answers[c], g.answers[r]], fields={k: v[[j]] for k, v in g.fields.items()})
             for g in groups for j, (c, r) in enumerate(g.pairs)]
    return groups, pairs


def _batches(groups, pairs):
    kw = dict(seq_len=SEQ, max_answer_len=10)
    multi = dict(max_answers=3, max_pairs=2)
    return {
        "concat": (packing.pack(pairs, layout="concat", **kw)[0], "concat"),
        "shared_prefix": (packing.pack(pairs, layout="shared_prefix", **kw)[0], "shared_prefix"),
        "multi_answer": (packing.pack(groups, layout="multi_answer", **kw, **multi)[0], "multi_answer"),
        "groups_per_row": (packing.pack(groups, layout="multi_answer", **kw | dict(seq_len=2 * SEQ), **multi,
                                        rows=[[0, 1], [2]], groups_per_row=2)[0], "multi_answer"),
    }


def test_every_layout_equals_separate_rows_in_logps_and_gradients(tiny_qwen35, monkeypatch):
    folder, _ = tiny_qwen35(False)
    monkeypatch.setattr(deltanet, "CHUNK", 8)
    groups, pairs = _groups(np.random.default_rng(0))
    with jax.enable_x64(True):
        model, _ = hf.load_hf(folder, run=config_lib.RunSettings(param_dtype=jnp.float64, scan_layers="on"))
        graphdef, params = nnx.split(model)
        out = {}
        for name, (batch, layout) in _batches(groups, pairs).items():
            loss_fn = train_step.dpo_loss(graphdef, train_step.DPOSettings(
                loss_type="sigmoid", beta=0.5, sft_weight=0.1, pair_layout=layout, reference="precomputed"))
            def loss(p, b, layout=layout):  # the gradient, and the pairs' log-likelihoods beside it
                total, (count, _) = loss_fn(p, {}, None, b)
                return total / count, logps.pair_logps(nnx.merge(graphdef, p), b, layout=layout)

            grad, values = jax.jit(jax.grad(loss, has_aux=True))(params, batch)
            used = np.asarray(batch.valid).reshape(-1) > 0
            out[name] = ({k: np.asarray(v)[used] for k, v in values.items()},
                         [np.asarray(g) for g in jax.tree.leaves(grad)])
    want, want_grad = out.pop("concat")
    assert len(want["chosen_logp"]) == 5 and np.all(want["chosen_count"] > 0)
    norm = np.sqrt(sum(np.sum(g ** 2) for g in want_grad))
    for name, (got, grad) in out.items():
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-9, err_msg=f"{name} {key}")
        diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(grad, want_grad)))
        assert norm > 1e-3 and diff / norm < 1e-9, (name, diff, norm)


def test_concat_rows_equal_transformers_separate_forwards(tiny_qwen35):
    """The oracle above is transformers': each pair's answers scored by one forward of [prompt][answer]."""
    folder, theirs = tiny_qwen35(False)
    import torch

    groups, pairs = _groups(np.random.default_rng(0))
    model, _ = hf.load_hf(folder)
    batch, _ = packing.pack(pairs, layout="concat", seq_len=SEQ, max_answer_len=10)
    got = nnx.jit(lambda m, b: logps.pair_logps(m, b, layout="concat"))(model, batch)
    for i, pair in enumerate(pairs):
        for key, answer in (("chosen_logp", pair.answers[0]), ("rejected_logp", pair.answers[1])):
            ids = torch.tensor([list(pair.prompt) + list(answer)])
            with torch.no_grad():
                logits = theirs(input_ids=ids).logits.double().log_softmax(-1)[0]
            P = len(pair.prompt)
            want = sum(float(logits[P - 1 + j, t]) for j, t in enumerate(answer))
            assert abs(float(got[key][i]) - want) < 2e-4 * len(answer), (i, key, float(got[key][i]), want)
