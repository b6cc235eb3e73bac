"""Shared-prefix pairs and multi-answer rows: the layouts, and log-likelihoods (and DPO gradients) equal
to the concat layout and to plain forwards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rdpo_jax import logps, packing, train_step
from rdpo_jax.models import config as config_lib
from rdpo_jax.models import hf, vision
from tests import tiny


def test_layout_positions_branches_targets_and_mask():
    pair = packing.Group(prompt=[11, 12, 13], answers=[[21, 22], [31, 32, 33]])
    b, stats = packing.pack([pair], layout="shared_prefix", seq_len=10, max_answer_len=4)
    assert stats == {"truncated_answers": 0, "truncated_tokens": 0}
    np.testing.assert_array_equal(b.input_ids[0], [11, 12, 13, 21, 22, 31, 32, 33, 0, 0])
    np.testing.assert_array_equal(b.positions[0], [0, 1, 2, 3, 4, 3, 4, 5, 0, 0])
    np.testing.assert_array_equal(b.branch_ids[0], [0, 0, 0, 1, 1, 2, 2, 2, -1, -1])
    np.testing.assert_array_equal(b.targets[0], [21, 22, 31, 32, 33, 0, 0, 0])
    # chosen[0] and rejected[0] are both predicted from the last prompt token (index 2)
    np.testing.assert_array_equal(b.target_index[0], [2, 3, 2, 5, 6, 0, 0, 0])
    np.testing.assert_array_equal(b.target_branch[0], [1, 1, 2, 2, 2, 0, 0, 0])
    mask = np.asarray(logps.attention_mask(jnp.asarray(b.branch_ids)))[0].astype(int)
    expected = np.zeros((10, 10), int)
    for q in range(8):
        for k in range(q + 1):
            expected[q, k] = not (q >= 5 and k in (3, 4))  # rejected never sees chosen
    np.testing.assert_array_equal(mask, expected)

    c, _ = packing.pack([pair], layout="concat", seq_len=6, max_answer_len=4)
    np.testing.assert_array_equal(c.input_ids, [[11, 12, 13, 21, 22, 0], [11, 12, 13, 31, 32, 33]])
    np.testing.assert_array_equal(c.positions, [[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(c.target_index, [[2, 3, 0, 0], [2, 3, 4, 0]])
    np.testing.assert_array_equal(c.target_branch, [[1, 1, 0, 0], [2, 2, 2, 0]])


def test_truncation_is_counted_and_prompts_never_truncated():
    pair = packing.Group(prompt=[1] * 4, answers=[[2] * 9, [3] * 2])
    b, stats = packing.pack([pair], layout="shared_prefix", seq_len=12, max_answer_len=5)
    assert stats == {"truncated_answers": 1, "truncated_tokens": 4}
    assert (b.target_branch[0] == 1).sum() == 5 and (b.target_branch[0] == 2).sum() == 2
    with pytest.raises(packing.PromptTooLongError, match="pair 0: prompt of 11 tokens leaves 1 of 12"):
        packing.pack([packing.Group([1] * 11, [[2], [3]])], layout="shared_prefix", seq_len=12, max_answer_len=5)
    with pytest.raises(ValueError, match="pair_layout 'stacked' is not one of"):
        packing.pack([pair], layout="stacked", seq_len=12, max_answer_len=5)
    s, stats = packing.pack([packing.Group([1, 2], [[5, 6, 7]], ())], layout="sft", seq_len=4, max_answer_len=8)
    assert stats["truncated_tokens"] == 1
    np.testing.assert_array_equal(s.input_ids, [[1, 2, 5, 6]])
    np.testing.assert_array_equal(s.target_index, [[1, 2, 0]])  # width seq_len − 1, not max_answer_len


@pytest.mark.parametrize("layout", packing.LAYOUTS)
def test_padding_rows_to_a_longer_bucket_equals_packing_them_there(layout):
    """What `pipeline.agree_shapes` relies on: a process whose rows fit a short bucket, padded to the
    bucket another process needs, holds exactly the rows a single process would pack there."""
    pairs = [packing.Group([11, 12, 13], [[21, 22], [31, 32, 33]]), packing.Group([14, 15], [[23], [34, 35]])]
    short, stats = packing.pack(pairs, layout=layout, seq_len=10, max_answer_len=4, pad_id=7)
    long, _ = packing.pack(pairs, layout=layout, seq_len=16, max_answer_len=4, pad_id=7)
    padded = short.pad(2, 16, short.targets.shape[1])
    assert padded.arrays().keys() == long.arrays().keys() and stats["truncated_answers"] == 0
    for k, v in long.arrays().items():
        np.testing.assert_array_equal(getattr(padded, k), v, err_msg=k)
    assert all(a is b for a, b in zip(jax.tree.leaves(short.pad(*short.sizes())), jax.tree.leaves(short)))
    with pytest.raises(ValueError, match="cannot pad a batch of .* to \\(2, 8, "):
        short.pad(2, 8, short.targets.shape[1])
    # a bucket too short for max_answer_len's targets holds seq_len − 1 of them; padded, as many as there
    T = 4 if layout == "concat" else 5
    shortest, _ = packing.pack(pairs[1:], layout=layout, seq_len=T, max_answer_len=4, pad_id=7)
    there, _ = packing.pack(pairs[1:], layout=layout, seq_len=16, max_answer_len=4, pad_id=7)
    assert shortest.targets.shape[1] == T - 1 < there.targets.shape[1]
    padded = shortest.pad(1, 16, there.targets.shape[1])
    for k, v in there.arrays().items():
        np.testing.assert_array_equal(getattr(padded, k), v, err_msg=k)
    # more units (a process with fewer packed rows): padding units, valid 0, of padding rows
    grown = short.pad(3, 10, short.targets.shape[1])
    assert grown.valid.tolist() == [[1], [1], [0]] and len(grown.input_ids) == 3 * len(short.input_ids) // 2
    assert (grown.input_ids[len(short.input_ids):] == 7).all() and (grown.branch_ids[len(short.input_ids):] == -1).all()


def _pairs(cfg, seed, n=4):
    """Pairs with prompts of different lengths (image placeholders inside) and unequal answers."""
    rng = np.random.default_rng(seed)
    F = cfg.image_seq_len
    pairs = []
    for i in range(n):
        head = list(rng.integers(6, tiny.VOCAB, 1 + i))
        tail = list(rng.integers(6, tiny.VOCAB, 2 + 2 * (i % 2)))
        pairs.append(packing.Group(head + [tiny.IMAGE_TOKEN] * F + tail,
                                   [list(rng.integers(6, tiny.VOCAB, 2 + i)), list(rng.integers(6, tiny.VOCAB, 7 - i))]))
    pixels = rng.standard_normal((n, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return pairs, pixels


def _plain_forward_logps(model, pairs, pixels, answers):
    """Σ log p(answer | prompt, image) from ordinary causal forwards, one right-padded row per answer."""
    rows = [list(p.prompt) + list(a) for p, a in zip(pairs, answers)]
    L = max(map(len, rows))
    ids = jnp.asarray([r + [0] * (L - len(r)) for r in rows], jnp.int32)
    mask = jnp.asarray([[1] * len(r) + [0] * (L - len(r)) for r in rows], jnp.int32)
    logp = jax.nn.log_softmax(nnx.jit(lambda m, i, p, a: m(i, p, a))(model, ids, jnp.asarray(pixels), mask))
    return [sum(float(logp[i, len(p.prompt) - 1 + j, t]) for j, t in enumerate(a))
            for i, (p, a) in enumerate(zip(pairs, answers))]


@pytest.mark.parametrize("name", ["clip_llama", "siglip_qwen3"])
def test_shared_prefix_equals_concat_and_plain_forwards(tiny_llava, name):
    folder, _ = tiny_llava(name)
    model, cfg = hf.load_hf(folder)
    pairs, pixels = _pairs(cfg, seed=1)
    seq_len = max(len(p.prompt) for p in pairs) + 12  # padding in every row
    out = {}
    for layout in packing.LAYOUTS:
        batch, _ = packing.pack(pairs, layout=layout, seq_len=seq_len, max_answer_len=8,
                                images={"pixel_values": pixels})
        fn = nnx.jit(lambda m, b, layout=layout: logps.pair_logps(m, b, layout=layout))
        out[layout] = {k: np.asarray(v) for k, v in fn(model, batch).items()}
    for key in ("chosen_logp", "rejected_logp", "chosen_count", "rejected_count"):
        np.testing.assert_allclose(out["shared_prefix"][key], out["concat"][key], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out["shared_prefix"]["chosen_count"], [len(p.answers[0]) for p in pairs])
    np.testing.assert_array_equal(out["shared_prefix"]["rejected_count"], [len(p.answers[1]) for p in pairs])
    plain = _plain_forward_logps(model, pairs + pairs, np.concatenate([pixels, pixels]),
                                 [p.answers[0] for p in pairs] + [p.answers[1] for p in pairs])
    np.testing.assert_allclose(out["shared_prefix"]["chosen_logp"], plain[:len(pairs)], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["shared_prefix"]["rejected_logp"], plain[len(pairs):], atol=1e-5, rtol=0)


def test_vision_tower_runs_once_per_pair_in_both_layouts(tiny_llava, monkeypatch):
    folder, _ = tiny_llava("siglip_qwen2")
    model, cfg = hf.load_hf(folder)
    pairs, pixels = _pairs(cfg, seed=2, n=3)
    seen = []
    original = vision.VisionTower.__call__

    def counting(self, images, feature_layers):
        seen.append(images.shape[0])
        return original(self, images, feature_layers)

    monkeypatch.setattr(vision.VisionTower, "__call__", counting)
    flops = {}
    for layout in packing.LAYOUTS:
        seen.clear()
        batch, _ = packing.pack(pairs, layout=layout, seq_len=40, max_answer_len=6, images={"pixel_values": pixels})
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda s, b, layout=layout: logps.pair_logps(nnx.merge(graphdef, s), b, layout=layout))
        compiled = fn.lower(state, batch).compile()
        flops[layout] = compiled.cost_analysis()["flops"]
        assert seen == [3]  # once per pair in both layouts (concat reuses a pair's features for its two rows)
    assert flops["shared_prefix"] < 0.8 * flops["concat"]


def test_multi_answer_row_layout_and_mask():
    group = packing.Group(prompt=[11, 12], answers=[[21, 22], [31], [41, 42, 43]], pairs=[(0, 1), (0, 2)],
                          positions=np.array([[0, 1], [0, 4], [0, 2]]))  # M-RoPE prompt positions
    b, stats = packing.pack([group], layout="multi_answer", seq_len=10, max_answer_len=4, max_answers=4, max_pairs=3,
                            mrope=True)
    assert stats["truncated_answers"] == 0 and b.targets.shape == (1, 9)  # 4·4 targets, at most 10 − 1
    np.testing.assert_array_equal(b.input_ids[0], [11, 12, 21, 22, 31, 41, 42, 43, 0, 0])
    np.testing.assert_array_equal(b.branch_ids[0], [0, 0, 1, 1, 2, 3, 3, 3, -1, -1])
    # every answer counts on from the prompt's largest position + 1 (= 5) on all three rows
    np.testing.assert_array_equal(b.positions[0, :, 2:8], [[5, 6, 5, 5, 6, 7]] * 3)
    np.testing.assert_array_equal(b.target_index[0, :6], [1, 2, 1, 1, 5, 6])
    np.testing.assert_array_equal(b.target_branch[0], [1, 1, 2, 3, 3, 3, 0, 0, 0])
    np.testing.assert_array_equal(b.pair_chosen, [[1, 1, 0]])
    np.testing.assert_array_equal(b.pair_rejected, [[2, 3, 0]])
    mask = np.asarray(logps.attention_mask(jnp.asarray(b.branch_ids)))[0]
    branch = b.branch_ids[0]
    for q in range(10):
        for k in range(10):
            sees = branch[q] >= 0 and branch[k] >= 0 and k <= q and branch[k] in (0, branch[q])
            assert mask[q, k] == sees, (q, k)
    # answers share a short row (4 tokens for 2 + 1 + 3): the shortest whole, the others to equal shares
    b, stats = packing.pack([group], layout="multi_answer", seq_len=6, max_answer_len=4, max_answers=3, max_pairs=2,
                            mrope=True)
    assert stats == {"truncated_answers": 2, "truncated_tokens": 2}
    np.testing.assert_array_equal(b.input_ids[0], [11, 12, 21, 31, 41, 42])
    np.testing.assert_array_equal(b.positions[0, 1], [0, 4, 5, 5, 5, 6])
    with pytest.raises(ValueError, match="group 0: pairs \\[\\(0, 3\\)\\] must name two different answers of 3"):
        packing.pack([packing.Group([1], [[2], [3], [4]], [(0, 3)])], layout="multi_answer", seq_len=8,
                     max_answer_len=2, max_answers=3, max_pairs=1)
    with pytest.raises(packing.PromptTooLongError, match="group 0: prompt of 6 tokens leaves 2 of 8 for 3 answers"):
        packing.pack([packing.Group([1] * 6, [[2], [3], [4]], [(0, 1)])], layout="multi_answer", seq_len=8,
                     max_answer_len=2, max_answers=3, max_pairs=1)


def test_groups_sharing_a_row_are_segments():
    one = packing.Group(prompt=[11, 12], answers=[[21, 22], [31]], pairs=[(0, 1)])
    two = packing.Group(prompt=[13], answers=[[41], [51, 52], [61]], pairs=[(1, 0), (2, 0)],
                        positions=np.array([0]))
    b, stats = packing.pack([one, two], layout="multi_answer", seq_len=12, max_answer_len=4, max_answers=3,
                            max_pairs=2, rows=[[1, 0], []], groups_per_row=2)
    assert stats["truncated_answers"] == 0 and b.input_ids.shape == (2, 12) and b.targets.shape == (2, 11)
    np.testing.assert_array_equal(b.input_ids[0], [13, 41, 51, 52, 61, 11, 12, 21, 22, 31, 0, 0])
    np.testing.assert_array_equal(b.segment_ids[0], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, -1, -1])
    np.testing.assert_array_equal(b.branch_ids[0], [0, 1, 2, 2, 3, 0, 0, 4, 4, 5, -1, -1])
    np.testing.assert_array_equal(b.positions[0], [0, 1, 1, 2, 1, 0, 1, 2, 3, 2, 0, 0])  # from 0 per segment
    # each answer's first token is predicted by its own segment's last prompt token
    np.testing.assert_array_equal(b.target_index[0, :7], [0, 0, 2, 0, 6, 7, 6])
    np.testing.assert_array_equal(b.target_branch[0, :8], [1, 2, 2, 3, 4, 4, 5, 0])
    # segment s holds pair slots [2s, 2s + 2): the second group's pairs (1, 0), (2, 0), then the first's
    np.testing.assert_array_equal(b.pair_chosen, [[2, 3, 4, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b.pair_rejected, [[1, 1, 5, 0], [0, 0, 0, 0]])
    assert (b.branch_ids[1] == -1).all() and (b.segment_ids[1] == -1).all()  # an empty row
    mask = np.asarray(logps.attention_mask(jnp.asarray(b.branch_ids), jnp.asarray(b.segment_ids)))[0]
    seg, branch = b.segment_ids[0], b.branch_ids[0]
    for q in range(12):
        for k in range(12):
            sees = branch[q] >= 0 and branch[k] >= 0 and k <= q and seg[k] == seg[q] and branch[k] in (0, branch[q])
            assert mask[q, k] == sees, (q, k)
    padded = b.pad(2, 14, 13)
    assert (padded.segment_ids[:, 12:] == -1).all() and padded.segment_ids.shape == (2, 14)
    with pytest.raises(ValueError, match="more than groups_per_row=1"):
        packing.pack([one, two], layout="multi_answer", seq_len=12, max_answer_len=4, max_answers=3, max_pairs=2,
                     rows=[[0, 1]])


def test_plan_rows_first_fit_decreasing():
    # the longest first, each into the first row with room; ties in input order
    assert packing.plan_rows([5, 3, 8, 3, 2], seq_len=10, rows=3, groups_per_row=2) == [[2, 4], [0, 1], [3]]
    assert packing.plan_rows([5, 3, 8, 3, 2], seq_len=10, rows=3, groups_per_row=3) == [[2, 4], [0, 1], [3]]
    assert packing.plan_rows([4, 3, 3], seq_len=10, rows=1, groups_per_row=3) == [[0, 1, 2]]
    assert packing.plan_rows([4, 3, 3], seq_len=10, rows=1, groups_per_row=2) is None  # a row holds two
    assert packing.plan_rows([6, 6], seq_len=10, rows=1, groups_per_row=2) is None  # 12 tokens in 10
    assert packing.plan_rows([], seq_len=10, rows=2, groups_per_row=2) == [[], []]
    # patches: at most max_weight per row, though the tokens would fit
    assert packing.plan_rows([2, 2, 2], seq_len=10, rows=2, groups_per_row=3, weights=[5, 5, 1],
                             max_weight=8) == [[0, 2], [1]]


def test_multi_answer_rows_equal_one_pair_rows_in_logps_and_gradients(tiny_llava):
    """On-policy groups (a prompt's pairs sharing answers) as one row each, or two groups sharing a row,
    = every pair its own row."""
    folder, _ = tiny_llava("clip_llama")
    model, cfg = hf.load_hf(folder)
    rng = np.random.default_rng(3)
    F = cfg.image_seq_len
    pair_lists = [[(0, 1), (0, 2), (0, 3)], [(1, 0), (2, 1)], [(0, 1)]]  # 4, 3 and 2 answers
    def text(n):  # token ids other than the image placeholder
        return [int(t) + (t >= tiny.IMAGE_TOKEN) for t in rng.integers(6, tiny.VOCAB - 1, n)]

    ref = rng.normal(-20, 3, (2, 6)).astype(np.float32)  # the 6 pairs' reference log-likelihoods, in order
    starts = np.cumsum([0] + [len(p) for p in pair_lists])
    groups = [packing.Group(text(1 + i) + [tiny.IMAGE_TOKEN] * F + text(2 + i),
                            [text(2 + (i + j) % 4) for j in range(4 - i)], pairs,
                            fields={"ref_chosen_logp": ref[0, starts[i]:starts[i + 1]],
                                    "ref_rejected_logp": ref[1, starts[i]:starts[i + 1]]})
              for i, pairs in enumerate(pair_lists)]
    pixels = rng.standard_normal((3, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    seq_len = F + 24
    grouped, _ = packing.pack(groups, layout="multi_answer", seq_len=seq_len, max_answer_len=6, max_answers=4,
                              max_pairs=3, images={"pixel_values": pixels})
    owner = [i for i, g in enumerate(groups) for _ in g.pairs]
    pairs = [packing.Group(g.prompt, [g.answers[c], g.answers[r]],
                           fields={"ref_chosen_logp": ref[0, [k]], "ref_rejected_logp": ref[1, [k]]})
             for k, (g, (c, r)) in enumerate((g, p) for g in groups for p in g.pairs)]
    single, _ = packing.pack(pairs, layout="shared_prefix", seq_len=seq_len, max_answer_len=6,
                             images={"pixel_values": pixels[owner]})
    slot = grouped.pair_chosen.reshape(-1) > 0  # which of the 3 × 3 pair slots hold pairs, in pair order
    assert slot.sum() == len(pairs) == 6
    np.testing.assert_array_equal(grouped.valid.reshape(-1), slot)
    np.testing.assert_array_equal(grouped.ref_chosen_logp.reshape(-1)[slot], ref[0])
    # groups 0 and 1 in one row (two segments, images in order), group 2 alone: 2 rows of 3 + 3 pair slots
    two = np.zeros((2, 2, *pixels.shape[1:]), np.float32)
    two[0], two[1, 0] = pixels[:2], pixels[2]
    packed, _ = packing.pack(groups, layout="multi_answer", seq_len=2 * seq_len, max_answer_len=6, max_answers=4,
                             max_pairs=3, rows=[[0, 1], [2]], groups_per_row=2,
                             images={"pixel_values": two, "num_images": np.array([2, 1], np.int32)})
    assert packed.pair_chosen.shape == (2, 6) and (packed.pair_chosen > 0).sum() == 6
    np.testing.assert_array_equal(packed.valid, packed.pair_chosen > 0)

    graphdef, params = nnx.split(model)
    splash_graph = nnx.graphdef(hf.load_hf(folder, config_lib.RunSettings(attention="splash"))[0])
    out = {}
    for name, batch in (("multi_answer", grouped), ("shared_prefix", single), ("packed", packed),
                        ("packed_splash", packed)):  # the packed rows' mask as splash's block mask too
        layout = "shared_prefix" if name == "shared_prefix" else "multi_answer"
        graphdef = splash_graph if name == "packed_splash" else nnx.graphdef(model)
        pair_logps = jax.jit(lambda p, b, layout=layout: logps.pair_logps(nnx.merge(graphdef, p), b, layout=layout))
        loss_fn = train_step.dpo_loss(graphdef, train_step.DPOSettings(loss_type="sigmoid", beta=0.5, sft_weight=0.1,
                                                                       pair_layout=layout, reference="precomputed"))
        grad = jax.jit(jax.grad(lambda p, b: (lambda s, aux: s / aux[0])(*loss_fn(p, {}, None, b))))
        out[name] = (pair_logps(params, batch), grad(params, batch))
    s_logps, s_grad = out["shared_prefix"]
    norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(s_grad)))
    for name, batch in (("multi_answer", grouped), ("packed", packed), ("packed_splash", packed)):
        g_logps, g_grad = out[name]
        used = batch.pair_chosen.reshape(-1) > 0
        for key in ("chosen_logp", "rejected_logp", "chosen_count", "rejected_count"):
            np.testing.assert_allclose(np.asarray(g_logps[key])[used], s_logps[key], atol=1e-5, rtol=0,
                                       err_msg=f"{name} {key}")
            assert not np.asarray(g_logps[key])[~used].any()
        diff = np.sqrt(sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(g_grad),
                                                                         jax.tree.leaves(s_grad))))
        assert norm > 1e-3 and diff / norm < 1e-5, (name, diff, norm)
    assert grouped.input_ids.size < 0.6 * single.input_ids.size  # 3 rows instead of 6
