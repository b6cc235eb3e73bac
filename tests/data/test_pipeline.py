"""The Grain pipeline: batches, determinism, per-process disjointness, resume, bad records, buckets."""

import io

import array_record.python.array_record_module as array_record_module
import msgpack
import numpy as np
import pytest
from PIL import Image

from rdpo_jax import logps, packing
from rdpo_jax.data import arrayrecord, images, pipeline, records
from data_prep import smoke
from rdpo_jax.data.tokenize import ChatTokenizer
from rdpo_jax.models import hf, image_inputs
from tests import tiny

NAME = "siglip_qwen2"
WORDS = smoke.WORDS[5:]


def _png(rng, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _text(rng, n):
    return " ".join(rng.choice(WORDS, n))


def pair_record(i: int) -> dict:
    rng = np.random.default_rng(i)
    k = 1 + i % 4
    rubric = {"criteria": [{"id": f"c{j}", "text": f"criterion {j}", "kind": "essential" if j == 0 else "additional",
                            "weight": 1.0 + j, "scale": "binary" if j % 2 == 0 else "1-5"} for j in range(k)]}
    scores = lambda: [int(rng.integers(0, 2)) if j % 2 == 0 else int(rng.integers(1, 6)) for j in range(k)]  # noqa
    return dict(pair_id=f"pair{i}", prompt_id=f"p{i}", images=[_png(rng)],
                messages=[{"role": "user", "content": [{"type": "image"},
                                                       {"type": "text", "text": _text(rng, 2 + i % 5)}]}],
                chosen=_text(rng, 3 + i % 6), rejected=_text(rng, 2 + i % 3) + " no", rubric=rubric,
                chosen_scores=scores(), rejected_scores=scores(), meta={"i": i},
                ref_chosen_logp=-float(i), ref_rejected_logp=-2.0 * i)


def write_pairs(folder, n=24, name="pairs", shards=3, raw: dict[int, bytes] | None = None) -> str:
    """Writes n pair records; `raw` replaces record i's bytes (bad records that the Writer would refuse)."""
    if not raw:
        arrayrecord.write(str(folder), name, "pairs", (pair_record(i) for i in range(n)), num_shards=shards)
        return str(folder / name)
    path = folder / arrayrecord.shard_name(name, 0, 1)
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for i in range(n):
        writer.write(raw[i] if i in raw else records.encode(pair_record(i), "pairs"))
    writer.close()
    manifest = {"kind": "pairs", "schema_version": 1, "count": n, "shards": [{"file": path.name, "count": n}]}
    (folder / (name + arrayrecord.MANIFEST_SUFFIX)).write_text(__import__("json").dumps(manifest))
    return str(folder / name)


@pytest.fixture(scope="module")
def model_folder(tiny_llava):
    return tiny_llava(NAME)[0]


def _dataset(model_folder, data, *, batch=4, seed=0, process=(0, 1), epochs=1, max_images=1, **options):
    """`batch` is the global batch (over all processes)."""
    cfg = hf.read_config(model_folder)
    options = {"kind": "pairs", "seq_buckets": (32, 48), "max_answer_len": 8, "max_criteria": 4, **options}
    tok = ChatTokenizer(model_folder, image_token_id=cfg.image_token_id)
    return pipeline.make_dataset(arrayrecord.Source(data), pipeline.Options(**options), tok,
                                 image_inputs.for_model(cfg, model_folder, max_images=max_images),
                                 global_batch_size=batch, seed=seed,
                                 num_epochs=epochs, process_index=process[0], process_count=process[1])


def test_batch_contents(model_folder, tmp_path):
    data = write_pairs(tmp_path, n=8)
    ds = _dataset(model_folder, data, require_reference=True)
    element = ds[0]
    batch, stats, index = element["batch"], element["stats"], element["index"]
    assert batch.input_ids.shape[0] == 4 and batch.input_ids.shape[1] in (32, 48)
    assert batch.images["pixel_values"].shape == (4, 1, 32, 32, 3) and batch.images["pixel_values"].dtype == np.float32
    assert batch.chosen_scores.shape == (4, 1, 4) and np.all(batch.valid == 1)
    assert stats["examples"] == 4 and stats["skipped/corrupt"] == 0
    cfg = hf.read_config(model_folder)
    tok = ChatTokenizer(model_folder, image_token_id=cfg.image_token_id)
    source = arrayrecord.Source(data)
    for row, i in enumerate(index):
        record = records.decode(source[int(i)][1], "pairs", "x")
        prompt = tok.prompt(record["messages"], [cfg.image_seq_len])
        np.testing.assert_array_equal(batch.input_ids[row, :len(prompt)], prompt)
        chosen = tok.answer(record["messages"], record["chosen"])[:8]
        np.testing.assert_array_equal(batch.targets[row][batch.target_branch[row] == 1], chosen)
        expected = images.load_and_preprocess(record["images"][0], images.image_config(model_folder))
        np.testing.assert_array_equal(batch.images["pixel_values"][row, 0], expected)
        n = len(record["rubric"]["criteria"])
        np.testing.assert_allclose(batch.chosen_scores[row, 0, :n],
                                   records.normalized_scores(record["rubric"], record["chosen_scores"]))
        assert batch.criterion_mask[row].sum() == n
        assert batch.ref_chosen_logp[row] == record["ref_chosen_logp"]
        assert np.all(batch.branch_ids[row, :len(prompt)] == packing.PROMPT)


def _all_indices(ds):
    return [int(i) for e in ds for i in e["index"] if i >= 0]


def test_deterministic_and_reshuffled_per_epoch(model_folder, tmp_path):
    data = write_pairs(tmp_path, n=12)
    a = _dataset(model_folder, data, seed=3, epochs=2)
    b = _dataset(model_folder, data, seed=3, epochs=2)
    order = _all_indices(a)
    assert order == _all_indices(b)
    assert sorted(order[:12]) == sorted(order[12:]) == list(range(12)) and order[:12] != order[12:]
    assert order != _all_indices(_dataset(model_folder, data, seed=4, epochs=2))
    np.testing.assert_array_equal(a[1]["batch"].input_ids, b[1]["batch"].input_ids)


def test_processes_read_disjoint_records(model_folder, tmp_path):
    data = write_pairs(tmp_path, n=12)
    seen = [_all_indices(_dataset(model_folder, data, batch=4, process=(p, 2))) for p in (0, 1)]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(12))


def test_global_batches_do_not_depend_on_the_process_count(model_folder, tmp_path):
    """Global batch s is a function of (seed, s) only: the processes' rows of it, in process order, are the
    rows one process reads — across epoch ends (10 records, batches of 4), for 1, 2 and 4 processes."""
    data = write_pairs(tmp_path, n=10)

    def rows(n, step):
        return np.concatenate([_dataset(model_folder, data, seed=5, epochs=None, process=(p, n))[step]["index"]
                               for p in range(n)])

    for step in range(6):
        one = rows(1, step)
        for n in (2, 4):
            np.testing.assert_array_equal(rows(n, step), one)
    # dataset[s:] starts at global batch s: a restored run continues the same order on any slice size
    ds = _dataset(model_folder, data, seed=5, epochs=None, process=(1, 2))
    np.testing.assert_array_equal(ds[3:][0]["index"], ds[3]["index"])


def test_a_finite_pass_gives_every_process_the_same_number_of_batches(model_folder, tmp_path):
    data = write_pairs(tmp_path, n=10)  # batches of 4 over 2 processes: the third global batch holds 2 records
    parts = [list(_dataset(model_folder, data, batch=4, process=(p, 2))) for p in (0, 1)]
    assert [len(p) for p in parts] == [3, 3]  # else the process with fewer would wait for the other forever
    assert [e["batch"].valid.tolist() for e in parts[1]] == [[[1], [1]], [[1], [1]], [[0], [0]]]
    assert [e["stats"]["examples"] for e in parts[0]] == [2, 2, 2]
    seen = [int(i) for p in parts for e in p for i in e["index"] if i >= 0]
    assert sorted(seen) == list(range(10))


@pytest.mark.parametrize("workers", [0, 1])  # 1: through a worker process (each costs ~7 s to start)
def test_resume_from_saved_state(model_folder, tmp_path, workers):
    data = write_pairs(tmp_path, n=16)
    ds = _dataset(model_folder, data, batch=2, epochs=None)
    it = pipeline.make_iterator(ds, workers=workers)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["index"] for _ in range(2)]
    again = pipeline.make_iterator(_dataset(model_folder, data, batch=2, epochs=None), workers=workers)
    again.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(again)["index"], want)
    for iterator in (it, again):
        if hasattr(iterator, "close"):
            iterator.close()


def _bad_bytes(model_folder):
    rng = np.random.default_rng(0)
    identical = pair_record(1)
    identical["rejected"] = identical["chosen"]
    bad_image = pair_record(2)
    bad_image["images"] = [b"\x89PNG not really"]
    long_prompt = pair_record(3)
    long_prompt["messages"][0]["content"][1]["text"] = _text(rng, 40)
    mismatch = pair_record(4)
    mismatch["chosen_scores"] = mismatch["chosen_scores"][:-1] + [1, 1]
    missing = pair_record(5)
    missing.pop("chosen")
    return {1: msgpack.packb(identical), 2: msgpack.packb(bad_image), 3: msgpack.packb(long_prompt),
            4: msgpack.packb(mismatch), 5: msgpack.packb(missing), 6: b"\x00\x01corrupt"}


def test_bad_records_are_counted_when_skipping(model_folder, tmp_path):
    data = write_pairs(tmp_path, n=8, raw=_bad_bytes(model_folder))
    ds = _dataset(model_folder, data, batch=8, on_bad_record="skip")
    element = ds[0]
    stats = element["stats"]
    assert {k.removeprefix("skipped/"): int(v) for k, v in stats.items() if k.startswith("skipped/") and v} == {
        "identical_answers": 1, "bad_image": 1, "prompt_too_long": 1, "scores_mismatch": 1, "schema": 1,
        "corrupt": 1}
    assert stats["examples"] == 2 and element["batch"].valid.sum() == 2
    assert sorted(int(i) for i in element["index"] if i >= 0) == [0, 7]


@pytest.mark.parametrize("bad,field", [(1, "rejected"), (2, "images[0]"), (3, "messages"), (4, "chosen_scores"),
                                       (5, "chosen"), (6, "<bytes>")])
def test_bad_record_errors_name_file_index_and_field(model_folder, tmp_path, bad, field):
    data = write_pairs(tmp_path, n=8, raw={bad: _bad_bytes(model_folder)[bad]})
    ds = _dataset(model_folder, data, batch=8, on_bad_record="error")
    with pytest.raises(records.RecordError, match=rf"pairs-00000-of-00001\.array_record\[{bad}\]: field "
                                                  rf"'{__import__('re').escape(field)}'"):
        ds[0]


def test_length_buckets_and_truncation(model_folder, tmp_path):
    data = write_pairs(tmp_path, n=16)
    lengths = {e["batch"].input_ids.shape[1] for e in _dataset(model_folder, data, batch=1, seq_buckets=(35, 48))}
    assert lengths == {35, 48}  # short batches use the short bucket (rows here need 31…41 tokens)
    e = _dataset(model_folder, data, batch=16, max_answer_len=2)[0]
    assert e["stats"]["truncated_answers"] > 0
    assert (e["batch"].target_branch == 1).sum(1).max() == 2


def test_sft_and_concat_layouts(model_folder, tmp_path):
    rng = np.random.default_rng(0)
    sft = [dict(images=[_png(rng)], messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text",
                "text": _text(rng, 3)}]}], answer=_text(rng, 4 + i)) for i in range(5)]
    arrayrecord.write(str(tmp_path), "sft", "sft", sft)
    e = _dataset(model_folder, str(tmp_path / "sft"), kind="sft", batch=4)[1]  # the last, padded batch
    assert e["batch"].valid.tolist() == [[1], [0], [0], [0]] and e["stats"]["examples"] == 1
    assert e["batch"].chosen_scores is None
    data = write_pairs(tmp_path, n=4)
    c = _dataset(model_folder, data, pair_layout="concat", batch=4)[0]["batch"]
    assert c.input_ids.shape[0] == 8 and c.valid.shape == (4, 1)


def test_tfds_builder_to_data_source_to_pipeline(model_folder, tmp_path):
    from rdpo_jax.data import tfds_source

    data = write_pairs(tmp_path, n=6)
    builder = tfds_source.PairsBuilder(config=tfds_source.PairsConfig(name="tiny", splits={"train": data}),
                                       data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(file_format="array_record")
    assert list((tmp_path / "tfds").rglob("*.array_record*"))
    source = tfds_source.TfdsSource("rdpo_pairs/tiny", split="train", data_dir=str(tmp_path / "tfds"))
    assert len(source) == 6 and source.where(2) == "tfds:rdpo_pairs/tiny/train[2]"
    ids = sorted(records.decode(source[i][1], "pairs", source.where(i))["pair_id"] for i in range(6))
    assert ids == sorted(f"pair{i}" for i in range(6))
    cfg = hf.read_config(model_folder)
    tok = ChatTokenizer(model_folder, image_token_id=cfg.image_token_id)
    ds = pipeline.make_dataset(source, pipeline.Options(kind="pairs", seq_buckets=(48,), max_answer_len=8,
                                                        max_criteria=4), tok,
                               image_inputs.for_model(cfg, model_folder, max_images=1),
                               global_batch_size=3, seed=0, num_epochs=1, process_index=0, process_count=1)
    assert [e["stats"]["examples"] for e in ds] == [3, 3]

    # any TFDS dataset: a converter maps its examples to records
    renamed = tfds_source.TfdsSource("rdpo_pairs/tiny", split="train", data_dir=str(tmp_path / "tfds"),
                                     convert=lambda ex: {**msgpack.unpackb(ex["record"]), "meta": {"via": "convert"}})
    assert records.decode(renamed[0][1], "pairs", "x")["meta"] == {"via": "convert"}


def test_batches_feed_the_dpo_step_as_global_arrays(model_folder, tmp_path):
    import jax
    import optax

    from rdpo_jax import sharding, train_step

    data = write_pairs(tmp_path, n=8)
    element = _dataset(model_folder, data, batch=8, require_reference=True)[0]
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    shardings = element["batch"].shardings(mesh)
    batch = pipeline.to_global(element["batch"], shardings)
    assert batch.input_ids.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    assert batch.images["pixel_values"].addressable_shards[0].data.shape[0] == 1
    model, _ = hf.load_hf(model_folder, mesh=mesh)
    optimizer = optax.sgd(0.0)
    graphdef, state = train_step.init_state(model, optimizer)
    step = train_step.make_dpo_step(graphdef, optimizer, optax.constant_schedule(0.0),
                                    train_step.DPOSettings(loss_type="rubric", beta=0.1, reference="precomputed")).train
    _, metrics = train_step.jit_step(step, state, element["batch"], mesh)(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["count"]) == 8


def test_sampled_token_ids_are_trained_as_they_are(model_folder, tmp_path):
    """Pairs carrying the policy's own ids (chosen_ids/rejected_ids) train on those ids when they come from
    this tokenizer; from another tokenizer, the text is tokenized instead."""
    cfg = hf.read_config(model_folder)
    tok = ChatTokenizer(model_folder, image_token_id=cfg.image_token_id)
    own, other = pair_record(0), pair_record(1)
    sampled = [tok.answer(own["messages"], "red circle")[:-1] + [tiny.VOCAB - 1], [tiny.VOCAB - 2]]  # not the text's
    for record, fingerprint in ((own, tok.fingerprint), (other, "sha256:another")):
        record.update(chosen_ids=sampled[0], rejected_ids=sampled[1], tokenizer=fingerprint)
    arrayrecord.write(str(tmp_path), "pairs", "pairs", [own, other])
    element = _dataset(model_folder, str(tmp_path / "pairs"), batch=2, seed=None)[0]
    batch = element["batch"]
    rows = {int(i): r for r, i in enumerate(element["index"])}
    trained = lambda row, branch: batch.targets[row][batch.target_branch[row] == branch].tolist()  # noqa
    assert trained(rows[0], 1) == sampled[0] and trained(rows[0], 2) == sampled[1]
    assert trained(rows[1], 1) == tok.answer(other["messages"], other["chosen"])[:8]


def test_llava_records_with_different_image_counts(model_folder, tmp_path):
    """A pool mixing records with 0, 1 and 2 images: one batch, `num_images` per row, each row's placeholders
    the count of its images; more than data.max_images is a counted skip."""
    rng = np.random.default_rng(5)
    recs = []
    for i, n in enumerate([0, 1, 2, 3]):
        r = pair_record(i)
        r["images"] = [_png(rng) for _ in range(n)]
        r["messages"][0]["content"] = [{"type": "image"}] * n + [{"type": "text", "text": "how many"}]
        recs.append(r)
    arrayrecord.write(str(tmp_path), "pairs", "pairs", recs)
    cfg = hf.read_config(model_folder)
    element = _dataset(model_folder, str(tmp_path / "pairs"), seed=None, max_images=2, seq_buckets=(64,),
                       on_bad_record="skip")[0]
    batch = element["batch"]
    assert batch.images["pixel_values"].shape == (4, 2, 32, 32, 3) and batch.images["num_images"].tolist() == [0, 1, 2, 0]
    counts = (batch.input_ids == cfg.image_token_id).sum(1)
    assert counts.tolist() == [0, cfg.image_seq_len, 2 * cfg.image_seq_len, 0]
    assert element["stats"]["skipped/image_count"] == 1 and batch.valid.tolist() == [[1], [1], [1], [0]]


@pytest.mark.parametrize("layout", packing.LAYOUTS)
def test_qwen_batches_equal_transformers_forwards(qwen_smoke_dir, layout):
    """Records with 0, 1 and 2 images of different sizes through the pipeline (patch buffers, 3D positions,
    every layout; multi_answer rows of one pair each): every answer's log-likelihood equals a transformers
    forward of [prompt][answer] alone."""
    import jax
    import torch
    import transformers
    from flax import nnx

    folder = f"{qwen_smoke_dir}/model"
    cfg = hf.read_config(folder)
    tok = ChatTokenizer(folder, image_token_id=cfg.image_token_id)
    adapter = image_inputs.for_model(cfg, folder, max_images=2, patch_buckets=(64, 288))
    options = pipeline.Options(kind="pairs", seq_buckets=(64, 128), max_answer_len=8, max_criteria=4,
                               pair_layout=layout)
    element = pipeline.make_dataset(arrayrecord.Source(f"{qwen_smoke_dir}/pairs"), options, tok, adapter,
                                    global_batch_size=8, seed=None, num_epochs=1, process_index=0,
                                    process_count=1)[0]
    batch = element["batch"]
    assert batch.positions.shape == (batch.input_ids.shape[0], 3, batch.input_ids.shape[1])
    model, _ = hf.load_hf(folder)
    ours = nnx.jit(lambda m, b: logps.pair_logps(m, b, layout=layout))(model, batch)
    theirs = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager")
    source = arrayrecord.Source(f"{qwen_smoke_dir}/pairs")
    counts = set()
    for row, i in enumerate(element["index"]):
        record = records.decode(source[int(i)][1], "pairs", "x")
        prepared = adapter.prepare(record["images"])
        counts.add(len(record["images"]))
        prompt = tok.prompt(record["messages"], prepared["tokens"] if prepared else [])
        for key in ("chosen", "rejected"):
            answer = tok.answer(record["messages"], record[key])[:8]
            ids = torch.tensor([prompt + answer])
            kw = {}
            if prepared:
                kw = dict(pixel_values=torch.tensor(prepared["patches"]),
                          image_grid_thw=torch.tensor(prepared["grids"]))
            with torch.no_grad():
                logits = theirs(input_ids=ids, mm_token_type_ids=(ids == cfg.image_token_id).long(), **kw).logits[0]
            theirs_logps = torch.log_softmax(logits.double(), -1)[len(prompt) - 1:-1].gather(1, torch.tensor(answer)[:, None])
            assert float(ours[f"{key}_logp"][row]) == pytest.approx(float(theirs_logps.sum()), abs=2e-4), (row, key)
    assert counts == {0, 1, 2}


def _rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ over two gradient trees."""
    import jax

    pairs = [(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return np.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in pairs) / sum(float(np.sum(y ** 2)) for _, y in pairs))


# ----- groups records: a prompt's pairs together -----

GROUP_PAIRS = {2: [(0, 1)], 3: [(0, 1), (0, 2), (2, 1)], 4: [(0, 1), (0, 2), (0, 3)]}  # by answer count


def group_record(i: int) -> dict:
    """A prompt group of 2, 3 or 4 answers and 1 or 3 pairs (reference log-likelihoods per pair)."""
    base = pair_record(i)
    rng = np.random.default_rng(100 + i)
    m, k = 2 + i % 3, len(base["rubric"]["criteria"])
    texts = [base["chosen"], base["rejected"]] + [_text(rng, 2 + j) + f" v{j}" for j in range(m - 2)]
    scores = lambda: [int(rng.integers(0, 2)) if j % 2 == 0 else int(rng.integers(1, 6)) for j in range(k)]  # noqa
    group = {f: base[f] for f in ("prompt_id", "images", "messages", "rubric")}
    group.update(group_id=f"group{i}", answers=[dict(text=t, scores=scores()) for t in texts],
                 pairs=[dict(pair_id=f"group{i}/{j}", chosen=c, rejected=r, meta={}, ref_chosen_logp=-1.0 - j - i,
                             ref_rejected_logp=-2.0 * i - j) for j, (c, r) in enumerate(GROUP_PAIRS[m])])
    return group


def write_groups(folder, n: int) -> tuple[str, str]:
    """n groups records and the same pairs as pairs records, in the same order: (groups, pairs) paths."""
    groups = [group_record(i) for i in range(n)]
    arrayrecord.write(str(folder), "groups", "groups", groups)
    arrayrecord.write(str(folder), "pairs", "pairs", [p for g in groups for p in records.pairs_of_group(g)])
    return str(folder / "groups"), str(folder / "pairs")


@pytest.mark.parametrize("layout", packing.LAYOUTS)
def test_groups_train_as_their_pairs_in_every_layout(model_folder, tmp_path, layout):
    """A batch of groups records (3 pair slots each) gives every pair the log-likelihoods, loss and
    gradients of the same pairs as pairs records; accumulated over two micro-batches (shared_prefix), the
    same gradients."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from rdpo_jax import train_step

    groups, pairs = write_groups(tmp_path, 6)
    n = sum(len(group_record(i)["pairs"]) for i in range(6))  # 1 + 3 + 3 + 1 + 3 + 3 = 14
    opts = dict(seq_buckets=(128,), max_answer_len=12, require_reference=True, pair_layout=layout, max_pairs_per_group=3)
    grouped = _dataset(model_folder, groups, batch=6, seed=None, **opts)[0]
    single = _dataset(model_folder, pairs, batch=n, seed=None, **opts)[0]
    g, s = grouped["batch"], single["batch"]
    assert g.valid.shape == (6, 3) and g.chosen_scores.shape == (6, 3, 4) and g.valid.sum() == n
    rows = {"shared_prefix": 18, "concat": 36, "multi_answer": 6}[layout]
    assert g.input_ids.shape[0] == rows and g.images["pixel_values"].shape[0] == 6
    assert grouped["stats"]["truncated_answers"] == single["stats"]["truncated_answers"] == 0
    slot = g.valid.reshape(-1) > 0
    for key in ("chosen_scores", "criterion_weights", "ref_chosen_logp", "ref_rejected_logp"):
        np.testing.assert_array_equal(getattr(g, key).reshape(18, -1)[slot].squeeze(), getattr(s, key).squeeze(1),
                                      err_msg=key)

    model, _ = hf.load_hf(model_folder)
    graphdef, params = nnx.split(model)
    loss_fn = train_step.dpo_loss(graphdef, train_step.DPOSettings(loss_type="rubric", beta=0.5, gamma=0.1, sft_weight=0.1,
                                                                   pair_layout=layout, reference="precomputed"))
    pair_logps = jax.jit(lambda p, b: logps.pair_logps(nnx.merge(graphdef, p), b, layout=layout))
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, {}, None, b), has_aux=True))
    for key, value in pair_logps(params, s).items():
        np.testing.assert_allclose(np.asarray(pair_logps(params, g)[key])[slot], value, atol=1e-5, rtol=0, err_msg=key)
    (g_grad, (g_count, _)), (s_grad, (s_count, _)) = grad(params, g), grad(params, s)
    assert float(g_count) == float(s_count) == n

    assert _rel(g_grad, s_grad) < 1e-5
    if layout != "shared_prefix":  # accumulation reads the layouts alike (rows per record from the shapes)
        return
    halves = g.split_micro(2)
    assert halves.input_ids.shape[:2] == (2, rows // 2) and halves.valid.shape == (2, 3, 3)
    summed = jax.tree.map(jnp.add, *(grad(params, jax.tree.map(lambda x, i=i: x[i], halves))[0] for i in (0, 1)))
    assert _rel(summed, g_grad) < 1e-5


def test_groups_over_processes_and_their_limits(model_folder, tmp_path):
    """Two processes' local batches of groups are the rows of the one-process batch, record by record; a
    group over data.max_pairs_per_group is a counted skip or an error naming the field."""
    groups, _ = write_groups(tmp_path, 8)
    opts = dict(seq_buckets=(96,), pair_layout="shared_prefix", max_pairs_per_group=3, seed=7, epochs=None)
    one = _dataset(model_folder, groups, batch=4, **opts)[1]
    two = [_dataset(model_folder, groups, batch=4, process=(p, 2), **opts)[1] for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([t["index"] for t in two]), one["index"])
    for key, value in one["batch"].arrays().items():
        np.testing.assert_array_equal(np.concatenate([getattr(t["batch"], key) for t in two]), value, err_msg=key)

    small = dict(opts, max_pairs_per_group=2, epochs=1, seed=None)
    skipped = list(_dataset(model_folder, groups, batch=4, on_bad_record="skip", **small))
    assert sum(int(e["stats"]["skipped/group_too_large"]) for e in skipped) == 5  # the groups of 3 pairs
    assert [int(i) for e in skipped for i in e["index"] if i >= 0] == [0, 3, 6]
    with pytest.raises(records.RecordError, match=r"groups-00000-of-00001.array_record\[1\]: field 'pairs': 3 pairs "
                                                  r"of 3 answers, more than data.max_pairs_per_group=2"):
        _dataset(model_folder, groups, batch=4, **small)[0]


def test_groups_sharing_rows_train_as_their_pairs(model_folder, tmp_path):
    """data.groups_per_row: a batch's records packed into fewer multi-answer rows (several segments each,
    images in order) gives every pair the log-likelihoods and gradients of its own row; records that do
    not fit the fewest rows take more (the fewest row slots of rows × buckets); accumulation splits the
    packed rows."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from rdpo_jax import train_step

    groups, pairs = write_groups(tmp_path, 6)
    n = sum(len(group_record(i)["pairs"]) for i in range(6))
    opts = dict(max_answer_len=12, require_reference=True, pair_layout="multi_answer", max_pairs_per_group=3)
    single = _dataset(model_folder, pairs, batch=n, seed=None, seq_buckets=(128,), **opts)[0]["batch"]
    alone = _dataset(model_folder, groups, batch=6, seed=None, seq_buckets=(64, 128), **opts)[0]
    packed = _dataset(model_folder, groups, batch=6, seed=None, seq_buckets=(64, 128), groups_per_row=3, **opts)[0]
    p, index = packed["batch"], packed["index"]
    assert p.input_ids.shape == (2, 128) and index.shape == (2, 3) and sorted(index.ravel()) == list(range(6))
    assert p.valid.shape == (2, 9) and p.valid.sum() == n and p.images["pixel_values"].shape[:2] == (2, 3)
    np.testing.assert_array_equal(p.images["num_images"], [3, 3])
    assert packed["stats"]["truncated_answers"] == 0 and int(packed["stats"]["examples"]) == n
    # 243 tokens in 2 × 128 instead of 6 × 64
    share = lambda b: 1 - (b.branch_ids >= 0).sum() / b.branch_ids.size  # noqa: E731
    assert share(p) < share(alone["batch"]) - 0.2, (share(p), share(alone["batch"]))
    # the pair slots in source order: record index[r, s]'s pairs at slots [3s, 3s + its pairs)
    order = sorted((int(i), r, 3 * s + j) for (r, s), i in np.ndenumerate(index)
                   for j in range(len(group_record(int(i))["pairs"])))
    where = np.array([r * 9 + slot for _, r, slot in order])
    for key in ("chosen_scores", "ref_chosen_logp", "ref_rejected_logp"):
        np.testing.assert_array_equal(getattr(p, key).reshape(18, -1)[where].squeeze(), getattr(single, key).squeeze(1),
                                      err_msg=key)

    model, _ = hf.load_hf(model_folder)
    graphdef, params = nnx.split(model)
    pair_logps = {layout: jax.jit(lambda q, b, layout=layout: logps.pair_logps(nnx.merge(graphdef, q), b,
                                                                               layout=layout))
                  for layout in ("multi_answer", "shared_prefix")}
    got, want = pair_logps["multi_answer"](params, p), pair_logps["shared_prefix"](params, single)
    for key, value in want.items():
        np.testing.assert_allclose(np.asarray(got[key])[where], value, atol=1e-5, rtol=0, err_msg=key)
    loss_fn = {layout: train_step.dpo_loss(graphdef, train_step.DPOSettings(loss_type="sigmoid", beta=0.5, pair_layout=layout,
                                                                            reference="precomputed"))
               for layout in ("multi_answer", "shared_prefix")}
    grad = {k: jax.jit(jax.grad(lambda q, b, f=f: f(q, {}, None, b), has_aux=True)) for k, f in loss_fn.items()}

    g_grad, s_grad = grad["multi_answer"](params, p)[0], grad["shared_prefix"](params, single)[0]
    assert _rel(g_grad, s_grad) < 1e-5
    halves = p.split_micro(2)
    assert halves.input_ids.shape == (2, 1, 128) and halves.images["pixel_values"].shape[:3] == (2, 1, 3)
    summed = jax.tree.map(jnp.add, *(grad["multi_answer"](params, jax.tree.map(lambda x, i=i: x[i], halves))[0]
                                     for i in (0, 1)))
    assert _rel(summed, g_grad) < 1e-5

    # records of 31 … 47 tokens (243 in all) do not fit 2 rows of 100: 4 of them (not 6, one record each)
    tight = _dataset(model_folder, groups, batch=6, seed=None, seq_buckets=(100,), groups_per_row=3, **opts)[0]
    assert tight["batch"].input_ids.shape == (4, 100) and tight["batch"].valid.sum() == n
    assert sorted(i for i in tight["index"].ravel() if i >= 0) == list(range(6))
    # processes with different row counts agree on the larger (empty rows, valid 0)
    grown = p.pad(4, *p.sizes()[1:])
    assert grown.input_ids.shape == (4, 128) and grown.valid[2:].sum() == 0
    assert (grown.branch_ids[2:] == -1).all() and (grown.images["num_images"][2:] == 0).all()
    with pytest.raises(ValueError, match="groups_per_row 2: rows pack several records only in SFT and in DPO's"):
        pipeline.Options(kind="pairs", seq_buckets=(64,), max_answer_len=8, groups_per_row=2)


def test_sft_examples_sharing_rows_train_as_alone(model_folder, tmp_path):
    """SFT with data.groups_per_row = 3: examples share rows as segments (images in order); every example's
    token log-likelihoods are those of its own row, and the SFT loss and gradients are the same."""
    import jax
    from flax import nnx

    from rdpo_jax import train_step

    rng = np.random.default_rng(1)
    sft = [dict(images=[_png(rng)], messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text",
                "text": _text(rng, 2 + i % 3)}]}], answer=_text(rng, 3 + i)) for i in range(6)]
    arrayrecord.write(str(tmp_path), "sft", "sft", sft)
    opts = dict(kind="sft", batch=6, seed=None, seq_buckets=(32, 96), max_answer_len=12)
    alone = _dataset(model_folder, str(tmp_path / "sft"), **opts)[0]
    packed = _dataset(model_folder, str(tmp_path / "sft"), groups_per_row=3, **opts)[0]
    a, p = alone["batch"], packed["batch"]
    assert p.input_ids.shape == (2, 96) and packed["index"].shape == (2, 3) and p.valid.tolist() == [[1], [1]]
    assert int(packed["stats"]["examples"]) == 6 and p.images["num_images"].tolist() == [3, 3]
    assert (p.branch_ids >= 0).sum() == (a.branch_ids >= 0).sum()  # the same tokens, in 2 rows, not 6

    model, _ = hf.load_hf(model_folder)
    graphdef, params = nnx.split(model)
    token_logps = jax.jit(lambda q, b: logps.token_logps(nnx.merge(graphdef, q), b))

    def per_example(b, index):  # {source index: its answer's summed log-likelihood}
        lp = np.asarray(token_logps(params, b))
        seg = np.zeros_like(b.input_ids) if b.segment_ids is None else b.segment_ids
        return {int(i): lp[r][(b.target_branch[r] > 0) & (seg[r][b.target_index[r]] == s)].sum()
                for (r, s), i in np.ndenumerate(index) if i >= 0}

    want, got = per_example(a, alone["index"][:, None]), per_example(p, packed["index"])
    assert sorted(got) == sorted(want) == list(range(6))
    for i in want:
        assert got[i] == pytest.approx(want[i], abs=1e-4), i
    loss = train_step.sft_loss(graphdef)
    grad = jax.jit(jax.grad(lambda q, b: (lambda s, aux: s / aux[0])(*loss(q, {}, None, b))))
    ga, gp = grad(params, a), grad(params, p)
    assert _rel(gp, ga) < 1e-5


# ----- the reference stamp: every setting that changes a reference log-likelihood's bits -----

def _stamped_pairs(smoke_dir, folder, config) -> str:
    """The smoke pairs with reference log-likelihoods stamped as ref_logps stamps them under `config`."""
    stamp = dict(ref_fingerprint=hf.fingerprint(f"{smoke_dir}/model"), ref_settings=pipeline.reference_settings(config))
    pairs = [dict(r, ref_chosen_logp=-1.0, ref_rejected_logp=-2.0, **stamp) for r in arrayrecord.read(f"{smoke_dir}/pairs")]
    arrayrecord.write(str(folder), "pairs_ref", "pairs", pairs)
    return str(folder / "pairs_ref")


def _other_model_files(smoke_dir, folder) -> str:
    """A copy of the smoke model (the same weights, so the same ref_fingerprint) with another chat template."""
    import shutil

    copy = shutil.copytree(f"{smoke_dir}/model", folder / "model")
    (copy / "chat_template.jinja").write_text((copy / "chat_template.jinja").read_text().replace("\n", "\n\n", 1))
    return str(copy)


@pytest.mark.parametrize("field,value", [("data.groups_per_row", 2), ("model.attention", "jax"),
                                         ("model.vocab_chunk", 8), ("model.scan_layers", "on"),
                                         ("model.path", _other_model_files)])
def test_the_trainer_refuses_reference_data_stamped_with_another_setting(smoke_dir, tmp_path, field, value):
    """Each of these changes the reference log-likelihoods' bits (the model folder: through its tokenizer,
    chat template and processor): data stamped under one value is refused under another, naming the field."""
    from rdpo_jax import config_checks, train
    from configs import smoke

    config = smoke.get_config(f"dir={smoke_dir}")
    config.dpo.pair_layout = "multi_answer"  # the layout where records share rows (data.groups_per_row)
    data = _stamped_pairs(smoke_dir, tmp_path, config)
    fingerprint = hf.fingerprint(f"{smoke_dir}/model")
    train._check_reference_data(data, pipeline.Options.from_config(config, reference_fingerprint=fingerprint))
    group, name = field.split(".")
    config[group][name] = value(smoke_dir, tmp_path) if callable(value) else value
    assert hf.fingerprint(config.model.path) == fingerprint
    with pytest.raises(config_checks.ConfigError, match=f"config.{field}: the reference log-likelihoods were computed "
                       "with .*, this run uses"):
        train._check_reference_data(data, pipeline.Options.from_config(config, reference_fingerprint=fingerprint))


def test_reference_data_of_an_older_stamp_is_read_and_refused_naming_the_missing_field(smoke_dir, tmp_path):
    """Schema 3 stamped fewer settings: its records still read, and a run with a precomputed reference refuses
    them, naming the first setting their stamp lacks."""
    from rdpo_jax import config_checks, train
    from configs import smoke

    config = smoke.get_config(f"dir={smoke_dir}")
    data = _stamped_pairs(smoke_dir, tmp_path, config)
    old = [dict(r, ref_settings={k: v for k, v in r["ref_settings"].items() if k != "model.attention"})
           for r in arrayrecord.read(data)]
    manifest = arrayrecord.write(str(tmp_path), "old", "pairs", old)
    assert manifest["schema_version"] == records.SCHEMA_VERSION == 4
    (tmp_path / "old.manifest.json").write_text(__import__("json").dumps(dict(manifest, schema_version=3)))
    assert list(arrayrecord.read(str(tmp_path / "old"))) == old
    options = pipeline.Options.from_config(config, reference_fingerprint=hf.fingerprint(f"{smoke_dir}/model"))
    with pytest.raises(config_checks.ConfigError, match="config.model.attention: not in the settings these reference "
                       "log-likelihoods were stamped with .older data_prep.ref_logps."):
        train._check_reference_data(str(tmp_path / "old"), options)
