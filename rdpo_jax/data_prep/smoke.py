"""Writes a tiny but complete training setup for smoke runs and tests (nothing downloaded).

    python -m rdpo_jax.data_prep.smoke --out=DIR [--pairs=32] [--sft=32] [--seed=0]

DIR/model      a Hugging Face LLaVA folder (SigLIP 32 px + Qwen2, a few thousand parameters per layer):
               config.json, random weights (model.safetensors), a word-level tokenizer with a ChatML
               chat template, and the LlavaProcessor (SigLIP image processor)
DIR/pairs      rubric-scored preference pairs (ArrayRecord + manifest), DIR/pairs_eval held-out pairs
DIR/sft        SFT examples
Texts are random words from a small vocabulary and images are random; the point is to exercise every
component with real files, not to learn anything.
"""

from __future__ import annotations

import io
import os

import numpy as np
from absl import app, flags

WORDS = ("system user assistant describe the image a an one two three four five red green blue yellow "
         "circle square triangle star small large left right top bottom of in is are there how many what "
         "colour shape and with no yes object objects picture shows").split()
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "<s>", "<image>"]  # ids 0…5
IMAGE_TOKEN = SPECIAL.index("<image>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tokenizer():
    """A word-level tokenizer over `WORDS` with ChatML-style special tokens and chat template."""
    import tokenizers
    import transformers

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    # no cleanup: "blue ." must decode to "blue .", which re-tokenizes to its ids ("blue." is one unknown word)
    tok.decoder = tokenizers.decoders.WordPiece(cleanup=False)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>", bos_token="<s>",
        additional_special_tokens=["<|im_start|>", "<image>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_config():
    import transformers

    return transformers.LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        text_config=dict(model_type="qwen2", vocab_size=len(SPECIAL) + len(WORDS), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-1, vision_feature_select_strategy="full")


def write_model(folder: str, seed: int = 0) -> None:
    import transformers

    from rdpo_jax.models import config as config_lib
    from rdpo_jax.models import hf, llava

    hf_config = model_config()
    cfg = config_lib.from_hf(hf_config)
    hf.save_hf(llava.create(cfg, seed=seed), folder, hf_config)
    processor = transformers.LlavaProcessor(
        image_processor=transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer(), patch_size=8, vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
        image_token="<image>", num_additional_image_tokens=0)
    processor.save_pretrained(folder)


def _png(rng) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _words(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS[3:], n))


def _messages(rng) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _words(rng, 3)}]}]


def pair(rng, i: int) -> dict:
    k = 3
    rubric = {"criteria": [{"id": f"c{j}", "text": _words(rng, 2), "kind": "essential" if j == 0 else "additional",
                            "weight": 1.0, "scale": "binary"} for j in range(k)]}
    chosen_scores = [1, int(rng.integers(0, 2)), 1]
    rejected_scores = [0, int(rng.integers(0, 2)), int(rng.integers(0, 2))]
    return dict(pair_id=f"pair{i}", prompt_id=f"p{i}", images=[_png(rng)], messages=_messages(rng),
                chosen=_words(rng, 4), rejected=_words(rng, 3), rubric=rubric, chosen_scores=chosen_scores,
                rejected_scores=rejected_scores, meta={"source": "smoke"})


def write_data(out: str, *, pairs: int, sft: int, seed: int) -> None:
    from rdpo_jax.data import arrayrecord

    rng = np.random.default_rng(seed)
    arrayrecord.write(out, "pairs", "pairs", [pair(rng, i) for i in range(pairs)], num_shards=2)
    arrayrecord.write(out, "pairs_eval", "pairs", [pair(rng, pairs + i) for i in range(max(pairs // 4, 2))])
    arrayrecord.write(out, "sft", "sft", [dict(images=[_png(rng)], messages=_messages(rng), answer=_words(rng, 5))
                                          for _ in range(sft)], num_shards=2)


_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_PAIRS = flags.DEFINE_integer("pairs", 32, "Training pairs.")
_SFT = flags.DEFINE_integer("sft", 32, "SFT examples.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights and data.")


def main(argv):
    del argv
    write_model(os.path.join(_OUT.value, "model"), seed=_SEED.value)
    write_data(_OUT.value, pairs=_PAIRS.value, sft=_SFT.value, seed=_SEED.value)
    print(f"wrote {_OUT.value}/model, pairs, pairs_eval, sft")


if __name__ == "__main__":
    app.run(main)
