"""Small real-kind tokenizers for tests, trained offline with `tokenizers` (nothing downloaded).

    build(kind, folder) -> folder     kind in KINDS

Each is a `transformers.PreTrainedTokenizerFast` saved with a chat template of its family:

    llama2     Llama-2's tokenizer.json layout (BPE, normalizer Prepend("▁") + Replace(" ", "▁"), no
               pre-tokenizer, Replace/ByteFallback/Fuse/Strip decoder) with LLaVA-1.5's template:
               `USER: <image>\\nQUESTION ASSISTANT:` then ` ANSWER</s>`
    metaspace  BPE behind a Metaspace pre-tokenizer (prepend_scheme="first", as Llama/Mistral
               tokenizers converted with legacy=False) with a Mistral-style `[INST] … [/INST]` template
    qwen2      byte-level BPE behind Qwen2's split regex, ChatML template (<|im_start|>/<|im_end|>), and a
               generation_config.json whose eos list holds <|im_end|> and <|endoftext|>
    llama3     byte-level BPE behind Llama-3's split regex, Llama-3's header template; the end of turn
               <|eot_id|> is not the eos token (<|end_of_text|>)

Every kind has an `<image>` special token at id IMAGE_TOKEN (= tiny.IMAGE_TOKEN) and at most VOCAB_SIZE
(= tiny.VOCAB) ids, so the tiny test models read these ids too. Each trains in a few milliseconds on
CORPUS; text outside it tokenizes into characters (or <unk> / nothing for characters never seen: the
vocabularies are too small for Llama-2's byte-fallback tokens or a full byte alphabet).
"""

from __future__ import annotations

import json
import os

KINDS = ("llama2", "metaspace", "qwen2", "llama3")
IMAGE_TOKEN = 5  # = tiny.IMAGE_TOKEN
VOCAB_SIZE = 160  # = tiny.VOCAB

# Questions, answers and the templates' own words, so every word the tests use has whole-word merges.
CORPUS = [
    "USER: ASSISTANT: system user assistant",
    "is there a red circle in the picture",
    "how many objects are there in the image",
    "describe the image",
    "answer yes or no",
    "There are two red circles and a blue square.",
    "Yes, there is a red circle on the left.",
    "No, the picture shows a green triangle.",
    "Hello there, the image shows three objects.",
]

# The content of a message: a string, or parts where an image part renders as the image token.
_CONTENT = ("{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
            "{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}")

TEMPLATES = {
    # LLaVA-1.5: the user turn ends with a space, the answer turn with </s> and nothing after it.
    "llama2": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}USER: " + _CONTENT + " "
               "{% elif m['role'] == 'assistant' %}ASSISTANT: " + _CONTENT + "</s>"
               "{% else %}" + _CONTENT + " {% endif %}{% endfor %}"
               "{% if add_generation_prompt %}ASSISTANT:{% endif %}"),
    "metaspace": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] " + _CONTENT +
                  " [/INST]{% elif m['role'] == 'assistant' %} " + _CONTENT + "</s>"
                  "{% else %}" + _CONTENT + "\n\n{% endif %}{% endfor %}"),
    "qwen2": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n" + _CONTENT + "<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "llama3": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               + _CONTENT + "<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
}

# Special tokens in id order (ids 0…): <image> at IMAGE_TOKEN; then the roles PreTrainedTokenizerFast gets.
_SPECIALS = {
    "llama2": (["<unk>", "<s>", "</s>", "<pad>", "<unused0>", "<image>"],
               dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")),
    "metaspace": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<image>", "<pad>"],
                  dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<image>"],
              dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")),  # no bos, as Qwen2's
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<image>", "<|finetune_right_pad_id|>"],
               dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                    pad_token="<|finetune_right_pad_id|>")),
}

_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _llama2(specials: list[str]):
    """BPE trained on "▁"-prefixed words (as SentencePiece's pieces are), then laid out as Llama-2's
    tokenizer.json: the normalizer, not a pre-tokenizer, turns spaces into "▁" and prepends one."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Training only: split words so that no merge spans two words, like SentencePiece's pieces.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(CORPUS + ["\n"], trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False))
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", specials.index("<s>"))])
    return tok


def _metaspace(specials: list[str]):
    """BPE behind a Metaspace pre-tokenizer: the layout of Llama/Mistral tokenizers converted with
    legacy=False (a Unigram model trained on this little text keeps "▁" apart from most words)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(CORPUS + ["\n"], trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False))
    return tok


def _byte_level(specials: list[str], split: str):
    """Byte-level BPE as Qwen2's and Llama-3's tokenizer.json: a split regex, then bytes as characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(CORPUS + ["\n\n"], trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False))
    return tok


def tokenizer(kind: str):
    """The kind's `transformers.PreTrainedTokenizerFast`, chat template set."""
    import transformers

    specials, roles = _SPECIALS[kind]
    if kind == "llama2":
        tok = _llama2(specials)
    elif kind == "metaspace":
        tok = _metaspace(specials)
    elif kind == "qwen2":
        tok = _byte_level(specials, _QWEN2_SPLIT)
    elif kind == "llama3":
        tok = _byte_level(specials, _LLAMA3_SPLIT)
    else:
        raise ValueError(f"tokenizer kind {kind!r} is not one of {KINDS}")
    named = set(roles.values())
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, **roles, additional_special_tokens=[t for t in specials if t not in named])
    fast.chat_template = TEMPLATES[kind]
    assert fast.convert_tokens_to_ids("<image>") == IMAGE_TOKEN and len(fast) <= VOCAB_SIZE
    return fast


def build(kind: str, folder: str) -> str:
    """Saves the kind's tokenizer (and, for qwen2, its generation_config.json) into `folder`; returns it."""
    tok = tokenizer(kind)
    os.makedirs(folder, exist_ok=True)
    tok.save_pretrained(folder)
    if kind == "qwen2":
        ids = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": ids, "pad_token_id": tok.pad_token_id}, f)
    return folder
