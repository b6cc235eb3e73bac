"""Generation: greedy equals transformers' generate token for token (with and without images); sampling
is reproducible and per row (a row's samples depend on its own key only); the per-step choice (suppression,
greedy and drawn rows, top-k, top-p, key folding, penalties) equals its closed form on fixed logits; the
decode loop run in chunks (as the server runs it) equals it run whole; settings are checked when made;
filters, stop tokens and several samples per prompt behave."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from rdpo_jax import sampling, sharding
from rdpo_jax.models import hf
from tests import tiny


def _prompts(cfg, seed=0):
    rng = np.random.default_rng(seed)
    F = cfg.image_seq_len
    prompts = [[7] + [tiny.IMAGE_TOKEN] * F + list(rng.integers(6, tiny.VOCAB, 3)),
               [8, 9] + [tiny.IMAGE_TOKEN] * F + list(rng.integers(6, tiny.VOCAB, 7))]  # different lengths
    ids, mask = sampling.left_pad(prompts, pad_id=0)
    size = cfg.vision.image_size
    return ids, mask, rng.standard_normal((2, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("name", ["siglip_qwen2", "clip_llama", "siglip_qwen3"])
def test_greedy_matches_transformers_generate(tiny_llava, name):
    folder, torch_model = tiny_llava(name)
    model, cfg = hf.load_hf(folder)
    ids, mask, pixels = _prompts(cfg)
    sc = sampling.SamplingConfig(max_new_tokens=12, temperature=0.0)
    tokens, lengths = sampling.generate(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels),
                                        jax.random.key(0), sc)
    px = torch.tensor(pixels.transpose(0, 3, 1, 2))
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=px,
                                   attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=12,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(tokens), ref[:, ids.shape[1]:].numpy())
    assert np.asarray(lengths).tolist() == [12, 12]


def test_qwen_greedy_matches_transformers_generate(tiny_qwen):
    """Qwen2.5-VL (`tiny_qwen.check_greedy`)."""
    from tests import tiny_qwen as tq

    folder, theirs = tiny_qwen(False)
    model, cfg = hf.load_hf(folder)
    tq.check_greedy(model, cfg, theirs)


def test_sampling_is_reproducible_and_sharded_equals_single(tiny_llava):
    folder, _ = tiny_llava("siglip_qwen2")
    model, cfg = hf.load_hf(folder)
    ids, mask, pixels = _prompts(cfg, 1)
    sc = sampling.SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, num_samples=4)
    args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))
    keys = lambda seed: sampling.row_keys(jax.random.key(seed), [0, 1], 4)  # noqa: E731
    a, _ = sampling.generate(model, *args, keys(3), sc)
    b, _ = sampling.generate(model, *args, keys(3), sc)
    c, _ = sampling.generate(model, *args, keys(4), sc)
    assert a.shape == (8, 10)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({tuple(r) for r in np.asarray(a)[:4]}) > 1  # the 4 samples of one prompt differ
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})  # prompts over data, heads over tensor
    sharded_model, _ = hf.load_hf(folder, mesh=mesh)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh):
        d, _ = sampling.generate(sharded_model, *jax.device_put(args, rows), keys(3), sc)
    np.testing.assert_array_equal(a, d)


def test_stop_tokens_end_rows_and_pad_the_rest(tiny_llava):
    folder, _ = tiny_llava("siglip_qwen2")
    model, cfg = hf.load_hf(folder)
    ids, mask, pixels = _prompts(cfg)
    args = (model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels), jax.random.key(0))
    free, _ = sampling.generate(*args, sampling.SamplingConfig(max_new_tokens=8, temperature=0.0))
    stop = int(free[0, 2])  # greedy row 0 emits this at step 2: make it a stop token
    tokens, lengths = sampling.generate(*args, sampling.SamplingConfig(max_new_tokens=8, temperature=0.0,
                                                                       stop_ids=(stop,), pad_id=-1))
    tokens = np.asarray(tokens)
    first = int(np.argmax(np.asarray(free[0]) == stop))
    assert int(lengths[0]) == first + 1
    np.testing.assert_array_equal(tokens[0, :first + 1], np.asarray(free)[0, :first + 1])
    assert np.all(tokens[0, first + 1:] == -1)


def test_filters_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 20)).astype(np.float32)
    out = np.asarray(sampling.filter_logits(jnp.asarray(logits), 0.5, top_k=5))
    for row, orig in zip(out, logits):
        kept = np.isfinite(row)
        assert kept.sum() == 5 and set(np.flatnonzero(kept)) == set(np.argsort(-orig)[:5])
        np.testing.assert_allclose(row[kept], orig[kept] / 0.5, rtol=1e-6)
    out = np.asarray(sampling.filter_logits(jnp.asarray(logits), 1.0, top_p=0.6))
    for row, orig in zip(out, logits):
        p = np.exp(orig - orig.max())
        p /= p.sum()
        order = np.argsort(-p)
        n = int(np.searchsorted(np.cumsum(p[order]), 0.6) + 1)  # smallest set with mass ≥ 0.6
        assert set(np.flatnonzero(np.isfinite(row))) == set(order[:n])


def _state(logits, settings, keys, step=3, **extra):
    """The decode state `pick` reads: fixed logits float32[R, V] and the rows' settings."""
    return {"logits": jnp.asarray(logits), **sampling.row_settings(settings), "keys": keys, "step": jnp.int32(step),
            **extra}


def test_pick_equals_its_closed_form_on_fixed_logits():
    """One batch of a greedy row, a top-p row so small only the best token survives, and a row drawn at
    temperature 0.7 without filters: the greedy rows take the argmax once the suppressed id (the best one)
    is gone; the drawn row's token is jax's categorical draw with fold_in(its key, step) from its logits / 0.7,
    the suppressed id removed; with top-k 2, every draw is one of the two best allowed tokens."""
    rng = np.random.default_rng(0)
    V = 12
    logits = rng.standard_normal((3, V)).astype(np.float32)
    best = logits.argmax(axis=1)
    logits[:, 5] = logits.max(axis=1) + 3.0  # the suppressed id would win every row
    base = dict(max_new_tokens=4, suppress_ids=(5,))
    settings = [sampling.SamplingConfig(temperature=0.0, **base), sampling.SamplingConfig(top_p=1e-6, **base),
                sampling.SamplingConfig(temperature=0.7, **base)]
    variant = sampling.Variant.of(settings)
    assert (variant.sample, variant.top_k, variant.top_p, variant.penalize) == (True, 0, True, False)
    allowed = np.where(np.arange(V) == 5, -np.inf, logits)
    for step in range(4):
        keys = jax.random.split(jax.random.key(step), 3)
        token = np.asarray(sampling.pick(_state(logits, settings, keys, step), variant))
        assert token[:2].tolist() == best[:2].tolist()
        draw = jax.random.categorical(jax.random.fold_in(keys[2], step), jnp.asarray(allowed[2]) / np.float32(0.7))
        assert token[2] == int(draw)
    top2 = [set(np.argsort(-row)[:2]) for row in allowed]
    drawn = [sampling.SamplingConfig(temperature=1.5, top_k=2, **base)] * 3
    seen = [set() for _ in range(3)]
    for step in range(32):
        token = sampling.pick(_state(logits, drawn, jax.random.split(jax.random.key(0), 3), step),
                              sampling.Variant.of(drawn))
        for r, t in enumerate(np.asarray(token).tolist()):
            seen[r].add(t)
    assert seen == top2


def test_penalties_equal_their_closed_form():
    """repetition (prompt or generated tokens: positive logits divided, negative ones multiplied), then
    frequency (per generated occurrence) and presence (once per generated token), per row; a neutral row's
    logits are exact."""
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 10)).astype(np.float32)
    seen = rng.random((2, 10)) < 0.3
    counts = rng.integers(0, 3, (2, 10)).astype(np.int32)
    settings = [sampling.SamplingConfig(1, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5),
                sampling.SamplingConfig(1)]
    out = np.asarray(sampling.penalize_logits(jnp.asarray(logits), _state(logits, settings, None, seen=seen,
                                                                           counts=counts)))
    hit = seen[0] | (counts[0] > 0)
    want = np.where(hit, np.where(logits[0] > 0, logits[0] / 1.5, logits[0] * 1.5), logits[0])
    want = want - 0.25 * counts[0] - 0.5 * (counts[0] > 0)
    np.testing.assert_allclose(out[0], want, rtol=1e-6)
    np.testing.assert_array_equal(out[1], logits[1])


def test_settings_are_checked_once_when_made():
    for bad in (dict(max_new_tokens=0), dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                dict(num_samples=0), dict(repetition_penalty=0.0), dict(temperature=float("nan")),
                dict(presence_penalty=float("inf"))):
        with pytest.raises(ValueError, match="expected"):
            sampling.SamplingConfig(**{"max_new_tokens": 4, **bad})
    with pytest.raises(ValueError, match="cannot share a batch"):
        sampling.Variant.of([sampling.SamplingConfig(4, stop_ids=(2,)), sampling.SamplingConfig(4, stop_ids=(3,))])
    # a greedy row's top_k does not matter: it shares a batch with drawn rows of another top_k
    assert sampling.Variant.of([sampling.SamplingConfig(4, temperature=0.0, top_k=5),
                                sampling.SamplingConfig(4, top_k=2)]).top_k == 2


def test_decode_in_chunks_equals_decode_at_once(tiny_llava):
    """The server's way (`decode` chunk after chunk of 3 steps) and the offline way (one `decode` of every
    step) give every row the same tokens and counts, in one batch of rows with different settings (greedy,
    drawn with and without top-p, penalized, shorter max_new_tokens, ignoring the stop id). A greedy row is
    `generate`'s greedy answer up to and including the stop id, then padding; the row ignoring the stop
    decodes all its tokens; every row ends at its max_new_tokens or just after a stop id."""
    folder, _ = tiny_llava("siglip_qwen2")
    model, cfg = hf.load_hf(folder)
    ids, mask, pixels = _prompts(cfg)
    free, _ = sampling.generate(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels), jax.random.key(0),
                                sampling.SamplingConfig(max_new_tokens=8, temperature=0.0))
    free = np.asarray(free)
    stop = int(free[1, 3])  # greedy prompt 1 emits it at step 3
    first = free[1].tolist().index(stop)
    base = dict(stop_ids=(stop,), pad_id=-1)
    settings = [sampling.SamplingConfig(8, temperature=0.0, **base),  # prompt 0
                sampling.SamplingConfig(5, temperature=1.0, top_p=0.9, **base),
                sampling.SamplingConfig(8, temperature=0.0, repetition_penalty=1.5, presence_penalty=0.5, **base),
                sampling.SamplingConfig(8, temperature=0.0, **base),  # prompt 1
                sampling.SamplingConfig(8, temperature=0.0, ignore_eos=True, **base),
                sampling.SamplingConfig(8, temperature=1.0, **base)]
    variant = sampling.Variant.of(settings)
    T, M = ids.shape[1], 8
    begin = nnx.jit(sampling.begin, static_argnames=("length", "repeat", "penalize"))
    decode = nnx.jit(sampling.decode, static_argnames=("variant", "steps", "prompt_len"))

    def run(steps):
        state = begin(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels), None, T + M,
                      sampling.row_settings(settings), jax.random.split(jax.random.key(1), 6), repeat=3,
                      penalize=variant.penalize)
        out = []
        for _ in range(-(-M // steps)):
            state, tokens = decode(model, state, variant, steps=steps, prompt_len=T)
            out.append(np.asarray(tokens))
        return np.concatenate(out, axis=1)[:, :M], np.asarray(state["count"])

    whole, count = run(M)
    chunked, chunked_count = run(3)
    np.testing.assert_array_equal(chunked, whole)
    np.testing.assert_array_equal(chunked_count, count)
    np.testing.assert_array_equal(whole[0, :count[0]], free[0, :count[0]])
    assert count[3] == first + 1 and whole[3, :count[3]].tolist() == free[1, :first + 1].tolist()
    assert count[4] == 8 and whole[4].tolist() == free[1].tolist()  # past the stop id it emits
    assert count[1] <= 5
    for r, s in enumerate(settings):
        row = whole[r, :count[r]].tolist()
        assert count[r] == s.max_new_tokens or (row[-1] == stop and not s.ignore_eos), (r, row)
        assert stop not in row[:-1] or s.ignore_eos, (r, row)
        assert np.all(whole[r, count[r]:] == -1)


def test_each_row_draws_from_its_own_key(tiny_llava):
    """A prompt's samples follow its keys (`row_keys`: its pool index, the sample number), wherever it sits
    in the batch and whatever else is in it: what makes a resumed `data_prep.sample` equal a fresh one."""
    folder, _ = tiny_llava("siglip_qwen2")
    model, cfg = hf.load_hf(folder)
    ids, mask, pixels = _prompts(cfg, 1)
    sc = sampling.SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, num_samples=4)
    base = jax.random.key(3)
    keys = sampling.row_keys(base, [10, 11], 4)
    np.testing.assert_array_equal(jax.random.key_data(sampling.row_keys(base, [11], 4)),
                                  jax.random.key_data(keys[4:]))
    a = np.asarray(sampling.generate(model, ids, mask, pixels, keys, sc)[0])
    swapped = np.asarray(sampling.generate(model, ids[::-1], mask[::-1], pixels[::-1],
                                           sampling.row_keys(base, [11, 10], 4), sc)[0])
    np.testing.assert_array_equal(swapped, np.concatenate([a[4:], a[:4]]))
    other = jnp.concatenate([sampling.row_keys(jax.random.key(4), [10], 1), keys[1:]])
    b = np.asarray(sampling.generate(model, ids, mask, pixels, other, sc)[0])
    np.testing.assert_array_equal(b[1:], a[1:])
    assert not np.array_equal(b[0], a[0])
    assert len({tuple(r) for r in a[:4]}) > 1  # one prompt's samples differ


def test_text_only_greedy_matches_transformers_generate(tiny_llava):
    folder, torch_model = tiny_llava("siglip_qwen2")
    model, _ = hf.load_hf(folder)
    ids, mask = sampling.left_pad([[7, 8, 9, 30, 31], [12, 40, 41, 42, 43, 44, 45, 46]], pad_id=0)
    sc = sampling.SamplingConfig(max_new_tokens=8, temperature=0.0)
    tokens, _ = sampling.generate(model, jnp.asarray(ids), jnp.asarray(mask), None, jax.random.key(0), sc)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                                   attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=8,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(tokens), ref[:, ids.shape[1]:].numpy())


def test_suppressed_ids_are_never_generated(tiny_llava):
    folder, _ = tiny_llava("siglip_qwen2")
    model, cfg = hf.load_hf(folder)
    ids, mask, pixels = _prompts(cfg)
    args = (model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels), jax.random.key(0))
    free = np.asarray(sampling.generate(*args, sampling.SamplingConfig(max_new_tokens=8, temperature=0.0))[0])
    banned = tuple(sorted(set(free[0].tolist())))  # every token greedy row 0 emits
    tokens = np.asarray(sampling.generate(*args, sampling.SamplingConfig(max_new_tokens=8, temperature=0.0,
                                                                         suppress_ids=banned))[0])
    assert not set(tokens[0].tolist()) & set(banned)


def _with_tokenizer(tiny_llava, kind, tmp_path):
    """The tiny siglip_qwen2 model folder with a real-kind tokenizer (tests/tokenizers.py) in place of its own."""
    import glob
    import os
    import shutil

    from tests import tokenizers

    folder = str(tmp_path / kind)
    shutil.copytree(tiny_llava("siglip_qwen2")[0], folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "chat_template.json", *map(os.path.basename, glob.glob(f"{folder}/*.txt"))):
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    return tokenizers.build(kind, folder)


def _sampler(folder):
    from rdpo_jax import inference

    return inference.load(folder, mesh=sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                                         devices=jax.devices()[:1]))


PROMPT = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}],
          "images": []}


def _prompt(rng):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
    return {**PROMPT, "images": [buf.getvalue()]}


def test_generation_stops_on_the_templates_end_of_turn_that_is_not_eos(tiny_llava, tmp_path):
    """Llama-3's template ends a turn with <|eot_id|>, not eos: generation stops there. (Everything but
    <|eot_id|> is suppressed so the random model must say it: without the stop, it would say it 6 times.)"""
    policy = _sampler(_with_tokenizer(tiny_llava, "llama3", tmp_path))
    tok = policy.tokenizer
    eot = tok.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot != tok.tokenizer.eos_token_id and eot in tok.stop_ids()
    sc = sampling.SamplingConfig(max_new_tokens=6, temperature=0.0, stop_ids=tok.stop_ids(), pad_id=tok.pad_id,
                                 suppress_ids=tuple(i for i in range(tiny.VOCAB) if i != eot))
    with jax.set_mesh(policy.mesh):
        [[(text, ids, stopped)]] = sampling.answer(policy, [_prompt(np.random.default_rng(0))], sc, jax.random.key(0))
    assert ids == [eot] and stopped and text == ""


@pytest.mark.parametrize("kind", ["llama2", "metaspace", "qwen2"])
def test_sampled_ids_train_unchanged(tiny_llava, tmp_path, kind):
    """The ids the policy sampled, carried by a pair record with their tokenizer's fingerprint, are the ids
    the training batch holds — whatever re-tokenizing their text would give (a random model's output is
    seldom the tokenizer's own tokenization of the decoded text)."""
    from rdpo_jax.data import arrayrecord, pipeline

    folder = _with_tokenizer(tiny_llava, kind, tmp_path)
    policy = _sampler(folder)
    cfg, tok, image_input = policy.config, policy.tokenizer, policy.image_input
    rng = np.random.default_rng(1)
    prompt = _prompt(rng)
    sc = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, stop_ids=tok.stop_ids(), pad_id=tok.pad_id,
                                 num_samples=2, suppress_ids=(cfg.image_token_id,))
    with jax.set_mesh(policy.mesh):
        [answers] = sampling.answer(policy, [prompt], sc, sampling.row_keys(jax.random.key(3), [0], 2))
    (_, chosen, _), (_, rejected, _) = answers
    assert chosen != rejected
    record = dict(pair_id="p/0", prompt_id="p", images=prompt["images"], messages=prompt["messages"],
                  chosen="first answer", rejected="second answer", chosen_ids=chosen, rejected_ids=rejected,
                  tokenizer=tok.fingerprint,
                  rubric={"criteria": [{"id": "a", "text": "ok", "kind": "essential", "weight": 1.0, "scale": "binary"}]},
                  chosen_scores=[1], rejected_scores=[0], meta={})
    arrayrecord.write(str(tmp_path), "pairs", "pairs", [record])
    options = pipeline.Options(kind="pairs", seq_buckets=(cfg.image_seq_len + 48,), max_answer_len=8, max_criteria=1)
    batch = pipeline.make_dataset(arrayrecord.Source(str(tmp_path / "pairs")), options, tok, image_input,
                                  global_batch_size=1, seed=None, num_epochs=1, process_index=0,
                                  process_count=1)[0]["batch"]
    targets, branch = batch.targets[0], batch.target_branch[0]
    assert targets[branch == 1].tolist() == chosen and targets[branch == 2].tolist() == rejected
    np.testing.assert_array_equal(batch.input_ids[0, :len(tok.prompt(prompt["messages"], [cfg.image_seq_len]))],
                                  tok.prompt(prompt["messages"], [cfg.image_seq_len]))  # after the very prompt they were sampled from


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_a_batch_mixing_image_counts_answers_each_prompt_as_alone(tiny_llava, qwen_smoke_dir, family):
    """Prompts with 0, 1 and 2 images in one `answer` call (LLaVA: blank images after a row's own;
    Qwen2.5-VL: patch buffers and 3D positions) give each prompt the greedy answer it gets alone."""
    import io

    from PIL import Image

    folder = tiny_llava("siglip_qwen2")[0] if family == "llava" else f"{qwen_smoke_dir}/model"
    policy = _sampler(folder)
    rng = np.random.default_rng(2)

    def png(h, w):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    prompts = [{"messages": [{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": "the red"}]}],
                "images": [png(*rng.integers(8, 49, 2)) for _ in range(n)]} for n in (2, 0, 1)]
    sc = policy.sampling_config(max_new_tokens=6, temperature=0.0)
    with jax.set_mesh(policy.mesh):
        together = sampling.answer(policy, prompts, sc, jax.random.key(0))
        alone = [sampling.answer(policy, [p], sc, jax.random.key(0))[0] for p in prompts]
    assert [a[0][1] for a in together] == [a[0][1] for a in alone]
