"""The families' image adapters: Qwen2.5-VL prompts equal `Qwen2_5_VLProcessor`'s (tokens, pixels, grids,
token types); patch buffers, buckets and budgets; rows with different numbers of images for both families."""

import io

import numpy as np
import pytest
import transformers
from PIL import Image

from data_prep import smoke
from rdpo_jax import batch
from rdpo_jax.data import images
from rdpo_jax.data.tokenize import ChatTokenizer
from rdpo_jax.models import hf, image_inputs
from rdpo_jax.models.qwen2_5_vl import images as qwen_images
from rdpo_jax.models.qwen2_5_vl import positions as qwen_positions


def _png(h, w, seed=0):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _processor(folder):
    """transformers' Qwen2_5_VLProcessor over the folder's image processor and tokenizer. Its constructor
    needs torchvision (for the video processor, which this CPU torch cannot import); its `__call__`, which
    expands the image tokens, needs only these two."""
    processor = transformers.Qwen2_5_VLProcessor.__new__(transformers.Qwen2_5_VLProcessor)
    processor.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    processor.image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(folder)
    processor.chat_template = None
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    processor.video_token_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    return processor


@pytest.fixture(scope="module")
def qwen(qwen_smoke_dir):
    folder = f"{qwen_smoke_dir}/model"
    cfg = hf.read_config(folder)
    tok = ChatTokenizer(folder, image_token_id=cfg.image_token_id)
    return folder, cfg, tok, image_inputs.for_model(cfg, folder, max_images=3, patch_buckets=(64, 288))


def test_qwen_prompt_equals_the_processor(qwen):
    folder, cfg, tok, adapter = qwen
    blobs = [_png(20, 44, 1), _png(48, 12, 2), _png(8, 8, 3)]  # 2×6, 6×2 and 1×1 merged tokens (round half even)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "the red"},
                                             {"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "how many"}]}]
    prepared = adapter.prepare(blobs)
    ours = tok.prompt(messages, prepared["tokens"])
    text = tok.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    theirs = _processor(folder)(text=[text], images=[images.decode_image(b) for b in blobs])
    assert ours == list(theirs["input_ids"][0])
    np.testing.assert_array_equal(theirs["mm_token_type_ids"][0], (np.asarray(ours) == cfg.image_token_id))
    assert [tuple(g) for g in theirs["image_grid_thw"].tolist()] == prepared["grids"] == [(1, 4, 12), (1, 12, 4),
                                                                                       (1, 2, 2)]
    np.testing.assert_array_equal(prepared["patches"], theirs["pixel_values"])
    positions = adapter.positions(np.asarray(ours), prepared)
    expected, _ = qwen_positions.rope_index((np.asarray(ours) == cfg.image_token_id).astype(int),
                                               prepared["grids"], merge_size=2)
    np.testing.assert_array_equal(positions, expected)


def test_qwen_patch_buffers_buckets_and_budgets(qwen):
    _, _, _, adapter = qwen
    small, large = adapter.prepare([_png(16, 16)]), adapter.prepare([_png(48, 48), _png(40, 40)])
    assert len(small["patches"]) == 16 and len(large["patches"]) == 144 + 100
    arrays, stats = adapter.collate([small, None, small])
    assert arrays["patches"].shape == (3, 64, 96)  # the smallest bucket holding the fullest row
    assert stats == {"patches": 32, "patch_slots": 192}
    assert (arrays["patch_image"][1] == -1).all() and (arrays["patch_image"][0, :16] == 0).all()
    arrays, _ = adapter.collate([small, large])
    assert arrays["patches"].shape[1] == 288
    np.testing.assert_array_equal(arrays["patch_image"][1, :244], [0] * 144 + [1] * 100)
    meta = qwen_images.patch_metadata(large["grids"], 2, 288)
    np.testing.assert_array_equal(arrays["patch_row"][1], meta["row"])
    padded = batch.pad_patches(arrays, 320)
    assert padded["patches"].shape[1] == 320 and (padded["patch_image"][:, 288:] == -1).all()
    with pytest.raises(images.ImageBudgetError, match="432 patches .* exceed the largest patch bucket, 288"):
        adapter.prepare([_png(48, 48)] * 3)
    with pytest.raises(images.ImageBudgetError, match="4 images, more than data.max_images=3"):
        adapter.prepare([_png(8, 8)] * 4)
    # records sharing a row: their images one after another, as one record holding them all
    merged = images.merge([small, None, large])
    assert merged["grids"] == small["grids"] + large["grids"] and merged["tokens"] == small["tokens"] + large["tokens"]
    together = adapter.collate([merged])[0]
    np.testing.assert_array_equal(together["patch_image"][0, :260], [0] * 16 + [1] * 144 + [2] * 100)
    np.testing.assert_array_equal(together["patches"][0, 16:260], large["patches"])
    assert images.merge([None, None]) is None
    # a pixel budget: a 48×48 image shrinks to at most 16·16 pixels (smart_resize), as the processor's
    budget = image_inputs.for_model(qwen[1], qwen[0], max_images=1, max_pixels=16 * 16, patch_buckets=(64,))
    assert budget.prepare([_png(48, 48)])["grids"] == [(1, 4, 4)]


def test_llava_rows_with_different_image_counts(tiny_llava):
    folder, _ = tiny_llava("siglip_qwen2")
    cfg = hf.read_config(folder)
    adapter = image_inputs.for_model(cfg, folder, max_images=2)
    one, two = adapter.prepare([_png(30, 40)]), adapter.prepare([_png(30, 40), _png(50, 20)])
    assert one["tokens"] == [cfg.image_seq_len] and two["tokens"] == [cfg.image_seq_len] * 2
    arrays, stats = adapter.collate([one, None, two])
    assert arrays["pixel_values"].shape == (3, 2, 32, 32, 3) and arrays["num_images"].tolist() == [1, 0, 2]
    assert not arrays["pixel_values"][0, 1].any() and stats == {"images": 3, "image_slots": 6}
    assert adapter.collate([None, None], slots=0) == ({}, {})
    with pytest.raises(ValueError, match="data.max_pixels: only any-resolution families"):
        image_inputs.for_model(cfg, folder, max_images=1, max_pixels=1000)
