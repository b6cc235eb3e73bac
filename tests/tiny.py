"""Tiny random transformers LLaVA models (no downloads) and matching random inputs for parity tests."""

from __future__ import annotations

import numpy as np

from data_prep import smoke
from rdpo_jax import testing
from rdpo_jax.models.llava import tiny as llava_tiny

# The parity configs' vocabulary and image token; the smoke setup's tokenizer (word level, ChatML) fits in it.
VOCAB = 160
IMAGE_TOKEN = testing.IMAGE_TOKEN

CONFIGS = llava_tiny.PARITY  # every tower, decoder, feature-layer and tying option LLaVA reads


def hf_config(name: str):
    import transformers

    return transformers.LlavaConfig(image_token_index=IMAGE_TOKEN, **CONFIGS[name])


def processor(name: str):
    """The LlavaProcessor matching a tiny config (its image processor and image-token count)."""
    import transformers

    cfg = hf_config(name)
    v = cfg.vision_config
    if v.model_type == "siglip_vision_model":
        image_processor = transformers.SiglipImageProcessorPil(size={"height": v.image_size, "width": v.image_size})
        extra = 0
    else:
        image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": v.image_size},
                                                             crop_size={"height": v.image_size, "width": v.image_size})
        extra = 1
    return transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=smoke.tokenizer(), patch_size=v.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, chat_template=testing.CHAT_TEMPLATE,
        image_token="<image>", num_additional_image_tokens=extra)


def build(name: str, folder: str):
    """Builds, randomizes (large enough weights that mistakes show) and saves a tiny LLaVA; returns
    (folder, torch model in eval mode, fp32, eager attention)."""
    import torch
    import transformers

    torch.manual_seed(sum(map(ord, name)))
    cfg = hf_config(name)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1 and "norm" in pname and pname.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(folder)
    processor(name).save_pretrained(folder)
    model.set_attn_implementation("eager")
    return folder, model


def inputs(name: str, *, batch: int = 3, length: int = 40, images_per_row: int = 1, seed: int = 0):
    """Random token ids with image placeholders, a padding mask (row 1 right-padded, row 2 left-padded)
    and NHWC images. Returns dict(input_ids, attention_mask, pixel_values)."""
    from rdpo_jax.models import families

    cfg = families.from_hf(hf_config(name))
    rng = np.random.default_rng(seed)
    F = cfg.image_seq_len
    ids = rng.integers(IMAGE_TOKEN + 1, VOCAB, (batch, length))
    mask = np.ones((batch, length), np.int32)
    for b in range(batch):
        start = 3 if b != 2 else 9
        for i in range(images_per_row):
            ids[b, start + i * (F + 2): start + i * (F + 2) + F] = IMAGE_TOKEN
    if batch > 1:
        mask[1, length - 6:] = 0
    if batch > 2:
        mask[2, :5] = 0
    size = cfg.vision.image_size
    pixels = rng.standard_normal((batch, images_per_row, size, size, 3)).astype(np.float32)
    return dict(input_ids=ids.astype(np.int32), attention_mask=mask,
                pixel_values=pixels if images_per_row > 1 else pixels[:, 0])


def torch_logits(model, batch: dict) -> np.ndarray:
    import torch

    px = batch["pixel_values"]
    px = px.reshape(-1, *px.shape[-3:]).transpose(0, 3, 1, 2)  # [B·N, C, H, W]
    with torch.no_grad():
        out = model(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                    pixel_values=torch.tensor(np.ascontiguousarray(px)),
                    attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long))
    return out.logits.float().numpy()


def jax_logits(model, batch: dict) -> np.ndarray:
    """The model's forward under nnx.jit (what training and sampling run)."""
    import jax.numpy as jnp
    from flax import nnx

    @nnx.jit
    def forward(m, ids, px, mask):
        return m(ids, px, mask)

    return np.asarray(forward(model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["pixel_values"]),
                              jnp.asarray(batch["attention_mask"])))


def max_diff_on_tokens(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Max |a - b| over real (unpadded) positions; padded query rows are garbage in both."""
    return float(np.abs(a - b)[mask.astype(bool)].max())
