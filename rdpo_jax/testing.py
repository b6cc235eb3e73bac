"""Files for tiny worlds — the smoke setup (`data_prep/smoke.py`), the demo (`demo/world.py`), the tests
and the benchmarks: a word-level tokenizer with a ChatML chat template, a family's tiny model as a Hugging
Face folder, and random PNG images. Nothing is downloaded; the worlds keep their own words and records.

The model comes from the family's `tiny` module (`models/<family>/tiny.py`: `VISION_TOKENS`,
`IMAGE_MARKUP`, `hf_config`, `save_processor`), found through the registry, so a new family needs nothing
here.
"""

from __future__ import annotations

import io

import numpy as np

from rdpo_jax.models import families

SPECIAL = ("<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "<s>", "<image>")  # ids 0…5
IMAGE_TOKEN = SPECIAL.index("<image>")
_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}IMAGE{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_TEMPLATE = _TEMPLATE.replace("IMAGE", "<image>")  # one image is one "<image>" (LLaVA's markup)


def tokenizer(words: list[str] | None = None, *, texts: list[str] | None = None, family: str = "llava"):
    """A word-level `transformers.PreTrainedTokenizerFast` with ChatML special tokens (`SPECIAL`, the end of
    turn is the end of sequence) and chat template, and the family's vision tokens and image markup.

    Args:
      words: the vocabulary after `SPECIAL`, in id order; the family's `VISION_TOKENS` follow it.
      texts: instead of `words`, texts to train the vocabulary on (`SPECIAL` and the vision tokens first).
      family: the model family (`models.families.FAMILIES`) whose image markup the template writes.
    """
    import tokenizers
    import transformers

    if (words is None) == (texts is None):
        raise ValueError("give either words or texts")
    tiny = families.get(family).tiny
    extra = list(tiny.VISION_TOKENS)
    if words is not None:
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
            {t: i for i, t in enumerate([*SPECIAL, *words, *extra])}, unk_token="<unk>"))
    else:
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    # no cleanup: "blue ." must decode to "blue .", which re-tokenizes to its ids ("blue." is one unknown word)
    tok.decoder = tokenizers.decoders.WordPiece(cleanup=False)
    if texts is not None:
        tok.train_from_iterator(texts, tokenizers.trainers.WordLevelTrainer(special_tokens=[*SPECIAL, *extra],
                                                                            min_frequency=1))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>", bos_token="<s>",
        additional_special_tokens=["<|im_start|>", "<image>", *extra])
    fast.chat_template = _TEMPLATE.replace("IMAGE", tiny.IMAGE_MARKUP)
    return fast


def write_model(folder: str, tokenizer, *, family: str = "llava", seed: int = 0, images: dict | None = None,
                **config) -> None:
    """The family's tiny model over `tokenizer` as a Hugging Face folder: config.json, random weights drawn
    from `seed` (model.safetensors), the tokenizer and the image processor.

    Args:
      images: image_size / patch_size for both the model and the processor (the family's defaults if None).
      config: the family's `tiny.hf_config` arguments (width, depth, tied, decoder fields).
    """
    from rdpo_jax.models import hf

    tiny = families.get(family).tiny
    images = images or {}
    hf_config = tiny.hf_config(tokenizer, **images, **config)
    hf.save_hf(families.create(families.from_hf(hf_config), seed=seed), folder, hf_config)
    tiny.save_processor(folder, tokenizer, **images)


def png(rng: np.random.Generator, size: tuple[int, int] = (24, 24)) -> bytes:
    """A PNG of uniform random pixels, `size` = (height, width)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
