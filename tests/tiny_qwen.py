"""Tiny random transformers Qwen2.5-VL, Qwen3-VL and Qwen3.5 models (no downloads; each family's parity config,
`models/<family>/tiny.py`) and packed inputs for parity tests (the two share tokens, patches and
positions)."""

from __future__ import annotations

import numpy as np

from rdpo_jax.models.qwen2_5_vl import tiny as qwen_tiny
from rdpo_jax.models.qwen3_5 import tiny as qwen3_5_tiny
from rdpo_jax.models.qwen3_5_moe import tiny as qwen3_5_moe_tiny
from rdpo_jax.models.qwen3_vl import tiny as qwen3_tiny
from rdpo_jax.models.qwen3_vl_moe import tiny as qwen3_moe_tiny

VOCAB = qwen_tiny.PARITY_TEXT["vocab_size"]
IMAGE, VIDEO, VISION_START, VISION_END = (qwen_tiny.PARITY_TOKENS[k] for k in (
    "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"))
PATCH_DIM = 3 * 2 * 4 * 4
MERGE = 2


# per family: (transformers config class, model class, the family's tiny module)
CLASSES = {"qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", qwen_tiny),
           "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", qwen3_tiny),
           "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", qwen3_moe_tiny),
           "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration", qwen3_5_tiny),
           "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration", qwen3_5_moe_tiny)}


def hf_config(tied: bool, family: str = "qwen2_5_vl", **text):
    import transformers

    config, _, t = CLASSES[family]
    return getattr(transformers, config)(vision_config=t.PARITY_VISION, text_config=t.PARITY_TEXT | text,
                                         **t.PARITY_TOKENS, tie_word_embeddings=tied)


def build(tied: bool, folder: str, family: str = "qwen2_5_vl", **text):
    """Builds, randomizes (norm scales around their initial value and biases too; MoE routers 4× larger, so
    that no token's top-k is a near tie) and saves a tiny model of the family (`text`: decoder fields over its parity config);
    returns (folder, torch model in eval mode, fp32, eager attention)."""
    import torch
    import transformers

    torch.manual_seed(7 + tied)
    model = getattr(transformers, CLASSES[family][1])(hf_config(tied, family, **text)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(0.6 * torch.randn_like(p))
            elif p.ndim == 1 and "norm" in name or name.endswith("ln_q.weight"):
                # around 1, or around 0 for a zero-centred norm's weight (Qwen3.5's (1 + w): initialized to 0)
                centred = name.endswith("weight") and not p.any()
                p.copy_((0.0 if centred else 1.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(folder)
    model.set_attn_implementation("eager")
    return folder, model


# Rows of (pieces, padding): a piece is a grid (1, h, w) — an image as vision_start, h·w/4 placeholders,
# vision_end — or a number of random text tokens. Merged grids 3×5 and 5×3 are not multiples of the
# 2×2 window (partial windows).
ROWS = [
    ([5, (1, 8, 8), 7], "right"),
    ([3, (1, 6, 10), 4, (1, 4, 4), 6], "left"),
    ([2, (1, 4, 12), 3, (1, 10, 6), 2, (1, 4, 4), 5], "right"),
    ([17], "right"),  # text only
]


def inputs(rows=ROWS, *, length: int = 64, buffer: int = 192, seed: int = 0):
    """Token ids, padding mask, token types and per-row grids; patches both HF's way (all images of the
    batch concatenated) and ours (one buffer of `buffer` patches per row). Each row is padded to `length`
    on its named side."""
    rng = np.random.default_rng(seed)
    B = len(rows)
    ids = np.zeros((B, length), np.int32)
    mask = np.zeros((B, length), np.int32)
    grids, patches = [], []
    for b, (pieces, pad) in enumerate(rows):
        row, row_grids = [], []
        for piece in pieces:
            if isinstance(piece, int):
                row += rng.integers(0, IMAGE, piece).tolist()
            else:
                t, h, w = piece
                row += [VISION_START] + [IMAGE] * (t * h * w // MERGE ** 2) + [VISION_END]
                row_grids.append(piece)
        assert len(row) <= length, (b, len(row))
        start = length - len(row) if pad == "left" else 0
        ids[b, start:start + len(row)] = row
        mask[b, start:start + len(row)] = 1
        grids.append(row_grids)
        patches.append([rng.standard_normal((t * h * w, PATCH_DIM)).astype(np.float32) for t, h, w in row_grids])
    return dict(input_ids=ids, attention_mask=mask, grids=grids, patches=patches, buffer=buffer)


def ours(batch: dict, vision_cfg):
    """Our model's inputs: QwenImages (one buffer per row) and 3D positions int32[B, 3, T]."""
    from rdpo_jax.models.qwen2_5_vl import images as qwen_images
    from rdpo_jax.models.qwen2_5_vl import positions as qwen_positions
    from rdpo_jax.models.qwen2_5_vl.model import QwenImages

    B, N = len(batch["grids"]), batch["buffer"]
    buf = np.zeros((B, N, PATCH_DIM), np.float32)
    meta = {k: np.zeros((B, N), np.int32) for k in ("image", "row", "col")}
    positions = np.zeros((B, 3, batch["input_ids"].shape[1]), np.int32)
    for b, (grids, pats) in enumerate(zip(batch["grids"], batch["patches"])):
        m = qwen_images.patch_metadata(grids, vision_cfg.merge_size, N)
        for k in meta:
            meta[k][b] = m[k]
        if pats:
            flat = np.concatenate(pats)
            buf[b, :len(flat)] = flat
        types = (batch["input_ids"][b] == IMAGE).astype(np.int32)
        positions[b], _ = qwen_positions.rope_index(types, grids, merge_size=MERGE,
                                                    valid=batch["attention_mask"][b] > 0)
    return QwenImages(buf, meta["image"], meta["row"], meta["col"]), positions


def torch_logits(model, batch: dict) -> np.ndarray:
    import torch

    grids = [g for row in batch["grids"] for g in row]
    pixels = np.concatenate([p for row in batch["patches"] for p in row])
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
                    pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids),
                    mm_token_type_ids=(ids == IMAGE).long())
    return out.logits.float().numpy()


def check_shared_prefix_row(model, cfg, theirs, atol: float = 1e-4):
    """One row [prompt with two images][chosen][rejected], both answers at the prompt's max position + 1 on
    all three axes, the branch mask of `packing`: its answers' logits equal two separate transformers
    forwards."""
    import jax.numpy as jnp

    from rdpo_jax import logps, packing
    from rdpo_jax.models.qwen2_5_vl import positions as qwen_positions

    rng = np.random.default_rng(3)
    pieces = [3, (1, 6, 10), 2, (1, 4, 4), 4]
    batch = inputs([(pieces, "right")], length=40)
    prompt = batch["input_ids"][0, :batch["attention_mask"][0].sum()].tolist()
    chosen, rejected = rng.integers(0, IMAGE, 7).tolist(), rng.integers(0, IMAGE, 5).tolist()
    row, _ = packing.pack([packing.Group(prompt, [chosen, rejected])], layout="shared_prefix", seq_len=64,
                          max_answer_len=8)
    P = len(prompt)
    prompt_pos, _ = qwen_positions.rope_index((np.asarray(prompt) == IMAGE).astype(np.int32), batch["grids"][0],
                                              merge_size=MERGE)
    positions = np.zeros((1, 3, 64), np.int32)
    positions[0, :, :P] = prompt_pos
    start = prompt_pos.max() + 1
    positions[0, :, P:P + 7] = start + np.arange(7)
    positions[0, :, P + 7:P + 12] = start + np.arange(5)
    images, _ = ours(batch, cfg.vision)
    mask = logps.attention_mask(jnp.asarray(row.branch_ids))
    logits = np.asarray(model(jnp.asarray(row.input_ids), images, mask, jnp.asarray(positions)))[0]
    for answer, offset in ((chosen, P), (rejected, P + 7)):
        separate = inputs([(pieces, "right")], length=P + len(answer))
        separate["input_ids"][0, P:] = answer
        separate["attention_mask"][0, P:] = 1
        expected = torch_logits(theirs, separate)[0]
        np.testing.assert_allclose(logits[offset:offset + len(answer) - 1], expected[P:P + len(answer) - 1],
                                   rtol=0, atol=atol)
        np.testing.assert_allclose(logits[P - 1], expected[P - 1], rtol=0, atol=atol)  # the first answer token


def check_greedy(model, cfg, theirs):
    """Left-padded prompts with two, one and no images of different sizes: `sampling.generate`'s greedy
    tokens equal transformers' `generate` (3D prompt positions, decode positions at the prompt's largest
    + 1 + step, transformers' rope_deltas)."""
    import jax
    import jax.numpy as jnp
    import torch

    from rdpo_jax import sampling

    rows = [([3, (1, 6, 10), 2, (1, 4, 4), 4], "left"), ([5, (1, 8, 8), 7], "left"), ([11], "left")]
    batch = inputs(rows, length=48)
    images, positions = ours(batch, cfg.vision)
    tokens, _ = sampling.generate(model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                                  images, jax.random.key(0), sampling.SamplingConfig(max_new_tokens=10, temperature=0.0),
                                  positions=jnp.asarray(positions))
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    with torch.no_grad():
        ref = theirs.generate(
            input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
            pixel_values=torch.tensor(np.concatenate([p for r in batch["patches"] for p in r])),
            image_grid_thw=torch.tensor([g for r in batch["grids"] for g in r]),
            mm_token_type_ids=(ids == IMAGE).long(), max_new_tokens=10, do_sample=False, eos_token_id=None,
            pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(tokens), ref[:, ids.shape[1]:].numpy())


def forward(model):
    """(jitted forward(state, ids, images, mask, positions) -> logits, the model's state)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, ids, images, mask, pos: nnx.merge(graphdef, s)(ids, images, mask, pos)), state


def check_config_error(folder: str, out, edit, field: str):
    """The folder's config.json changed by `edit(dict)` into folder `out`: reading it raises an
    UnsupportedConfigError naming `field`."""
    import json
    import os

    import pytest

    from rdpo_jax.models import config as config_lib
    from rdpo_jax.models import hf

    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    raw.setdefault("text_config", {})
    edit(raw)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(config_lib.UnsupportedConfigError, match=rf"config\.json: .*{field}"):
        hf.read_config(str(out))


def check_sharded_float64(folder: str, capfd):
    """On an (fsdp 2, expert 2, tensor 2) mesh, layers scanned, the logits equal one device's in float64
    (1e-10), where the order of sums cannot hide a difference; XLA gathers nothing whole."""
    import jax
    import jax.numpy as jnp

    from rdpo_jax import sharding
    from rdpo_jax.models import config as config_lib
    from rdpo_jax.models import hf

    mesh = sharding.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    batch = inputs()
    with jax.enable_x64(True):
        run = config_lib.RunSettings(scan_layers="on", param_dtype=jnp.float64)
        single, cfg = hf.load_hf(folder, run=run)
        sharded, _ = hf.load_hf(folder, run=run, mesh=mesh)
        images, positions = ours(batch, cfg.vision)
        images = images._replace(patches=images.patches.astype(np.float64))
        fn, state = forward(single)
        expected = np.asarray(fn(state, batch["input_ids"], images, batch["attention_mask"], positions))
        fn, state = forward(sharded)
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
        args = jax.device_put((batch["input_ids"], images, batch["attention_mask"], positions), rows)
        with jax.set_mesh(mesh):
            got = np.asarray(sharding.traced_on(mesh, fn)(state, *args))
    valid = batch["attention_mask"].astype(bool)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got[valid], expected[valid], rtol=0, atol=1e-10)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def check_reload(folder: str, theirs, architecture: str):
    """`folder` (what `save_hf` wrote) loads in transformers' `architecture` class with no missing,
    unexpected or misshapen keys, to the logits of `theirs` (the model it was read from) within 1e-6."""
    import transformers

    reloaded, info = getattr(transformers, architecture).from_pretrained(
        folder, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    batch = inputs()
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(torch_logits(reloaded.eval(), batch)[valid], torch_logits(theirs, batch)[valid],
                               rtol=0, atol=1e-6)
