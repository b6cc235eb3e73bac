"""Chat-template tokenization: prompts (image placeholders expanded) and answer ids (ending the turn).

The model folder's tokenizer renders the conversation with its chat template (the processor's
`chat_template.jinja`/`.json` when the tokenizer has none). The prompt is the conversation rendered with
`add_generation_prompt=True`; the answer is what rendering the conversation plus the assistant message
adds after that prompt, up to and including the end-of-turn token (trailing whitespace dropped). The
i-th image placeholder token in the prompt expands to as many copies as image i has features (LLaVA: a
fixed count; Qwen2.5-VL: h·w/4 of its patch grid, between the template's vision start/end tokens), as
the HF processors do, so the model's image features fill them one to one. Only answer tokens are
trained. `ChatTokenizer.encode` is the one way a conversation and its images become a model's prompt
(`Prompt`): training records, the offline sampler and the server all call it.

Answer ids are cut out of the whole conversation's tokens, never tokenized alone: a text tokenized alone
is tokenized as the start of a text, and tokenizers treat starts specially (Llama-2's normalizer prepends
"▁", so the answer " Hello" alone would give "▁" "▁Hello" where the model generates "▁Hello" after the
prompt). The ids trained are thus the ids the model produces after the prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import threading
from collections.abc import Sequence

import numpy as np

PLACEHOLDER = "image"  # the part type that renders as the image token


class TemplateError(ValueError):
    """The chat template cannot split a conversation into prompt and answer."""


# The files a tokenizer's ids depend on (whichever the folder has), chat templates included.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json")


@dataclasses.dataclass(frozen=True, eq=False)
class Prompt:
    """A conversation as the model reads it.

    ids: int32[P], the chat template rendered with the generation prompt, placeholders expanded.
    images: the images as the family's adapter prepared them (`image_input.prepare`), None without images.
    positions: int32[3, P] for M-RoPE families (`image_input.positions`), None where positions count tokens.
    """
    ids: np.ndarray
    images: dict | None
    positions: np.ndarray | None


class ChatTokenizer:
    """Picklable (the tokenizer loads lazily in each worker process) and safe to share between threads (the
    server's request handlers and its engine): every call into the HF tokenizer holds one lock, since a fast
    tokenizer used by two threads at once fails ("Already borrowed")."""

    def __init__(self, model_folder: str, *, image_token_id: int):
        self.folder, self.image_token_id = model_folder, image_token_id
        self._tok = None
        self._lock = threading.RLock()

    def __getstate__(self):
        return {**self.__dict__, "_tok": None, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.RLock())

    @property
    def tokenizer(self):
        with self._lock:
            if self._tok is None:
                import transformers

                tok = load_tokenizer(self.folder)
                if not tok.chat_template:
                    tok.chat_template = _processor_template(self.folder)
                self._tok = tok
        return self._tok

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def encode(self, messages: list[dict], images: Sequence[bytes], image_input) -> Prompt:
        """The prompt of `messages` and their images' bytes for a family's image adapter (`image_input`:
        preprocessing, placeholders per image, positions). Raises the adapter's image errors
        (`images.ImageError`, `images.ImageBudgetError`) and TemplateError, for the caller to report."""
        prepared = image_input.prepare(images)
        ids = np.asarray(self.prompt(messages, prepared["tokens"] if prepared else []), np.int32)
        return Prompt(ids, prepared, image_input.positions(ids, prepared))

    def prompt(self, messages: list[dict], image_tokens: Sequence[int]) -> list[int]:
        """Token ids of the prompt, the i-th image placeholder expanded to `image_tokens[i]` copies;
        checks one placeholder per image."""
        with self._lock:
            ids = self._ids(self._render(messages, True))
        found = ids.count(self.image_token_id)
        if found != len(image_tokens):
            raise TemplateError(f"the rendered prompt holds {found} image tokens for {len(image_tokens)} images "
                                f"(token id {self.image_token_id})")
        out: list[int] = []
        counts = iter(image_tokens)
        for t in ids:
            out.extend([t] * next(counts) if t == self.image_token_id else [t])
        return out

    def answer(self, messages: list[dict], answer: str) -> list[int]:
        """Token ids of the assistant's answer to `messages`, ending with the end-of-turn token.

        They are the whole conversation's tokens that start at or after the end of the rendered prompt,
        so where the conversation's tokens start with the prompt's (as they do for the usual templates)
        they are exactly what follows the prompt. A token that straddles the prompt's end (a merge of the
        prompt's last characters with the answer's first) stays with the prompt, which the model is given
        whole: when the answer characters it takes are whitespace they are dropped, else a TemplateError
        is raised, since no ids continue the prompt's ids and spell the answer.
        """
        with self._lock:
            ids = self._answer_ids(messages, answer)
        if self.image_token_id in ids:
            raise TemplateError("the answer contains the image token")
        return ids

    def _answer_ids(self, messages: list[dict], answer: str) -> list[int]:
        prompt = self._render(messages, True)
        full = self._render(messages + [{"role": "assistant", "content": answer}], False)
        if not full.startswith(prompt):
            raise TemplateError("the chat template renders the conversation differently once the answer is "
                                "appended, so prompt and answer cannot be split")
        start, end = len(prompt), len(full.rstrip())  # tokens wholly in the trailing whitespace are dropped
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = []
        for token, (first, last) in zip(enc["input_ids"], enc["offset_mapping"]):
            if first < start < last and full[start:last].strip():
                raise TemplateError(f"the answer's start {full[start:last]!r} merges into the prompt's last "
                                    f"token {full[first:last]!r}, so the answer cannot follow the prompt's ids")
            if start <= first < end:
                ids.append(token)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of generated ids, special tokens skipped."""
        with self._lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stop_ids(self) -> tuple[int, ...]:
        """The ids generation stops on, sorted: the tokenizer's eos, the eos id(s) of the folder's
        generation_config.json, and the chat template's end-of-turn token."""
        with self._lock:
            ids = {self.tokenizer.eos_token_id, self._end_of_turn()}
        path = os.path.join(self.folder, "generation_config.json")
        if os.path.exists(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos])
        return tuple(sorted(i for i in ids if i is not None))

    def _end_of_turn(self) -> int | None:
        """The token that ends an assistant turn in the chat template, or None if that is no added token
        (a template that ends the turn with a newline or a word marks no end of turn to stop on)."""
        error = None
        # The user turn as records write it (parts), else as a string for templates that want one.
        for content in ([{"type": "text", "text": "Hi"}], "Hi"):
            try:
                ids = self._answer_ids([{"role": "user", "content": content}], "Hello")
            except Exception as e:  # jinja raises many exception types for content a template cannot render
                error = e
                continue
            tok = self.tokenizer
            last = ids[-1] if ids else None
            return last if last in tok.added_tokens_decoder and last != tok.unk_token_id else None
        raise TemplateError(f"the chat template cannot render a one-turn conversation: {error}") from error

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short content hash of the folder's tokenizer files: names the tokenizer that token ids
        come from, the same for a copy of the files anywhere (read once: the pipeline asks per record)."""
        digest = hashlib.sha256()
        found = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(self.folder, name))]
        if not found:
            raise FileNotFoundError(f"{self.folder}: no tokenizer files (any of {', '.join(TOKENIZER_FILES)})")
        for name in found:
            with open(os.path.join(self.folder, name), "rb") as f:
                data = f.read()
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
        return "sha256:" + digest.hexdigest()[:16]


GENERIC = ("TokenizersBackend", "PreTrainedTokenizerFast")  # "tokenizer.json as it is written"


def load_tokenizer(folder: str):
    """The folder's tokenizer, as `AutoTokenizer` picks it — unless its tokenizer_config.json names a generic
    class (`GENERIC`): that folder's tokenizer.json is used as written. (transformers 5 replaces such a
    declaration by the model type's own class for some types, e.g. `Qwen3_5Tokenizer` for qwen3_5, which
    rebuilds a byte-level BPE from the file's vocabulary: right for the Hub's files, which name another class,
    and ruinous for any other tokenizer.json, such as the word-level ones of the tiny test models.)"""
    import transformers

    path = os.path.join(folder, "tokenizer_config.json")
    declared = None
    if os.path.exists(path):
        with open(path) as f:
            declared = json.load(f).get("tokenizer_class")
    if declared in GENERIC and os.path.exists(os.path.join(folder, "tokenizer.json")):
        return transformers.TokenizersBackend.from_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def _processor_template(folder: str) -> str:
    jinja, js = os.path.join(folder, "chat_template.jinja"), os.path.join(folder, "chat_template.json")
    if os.path.exists(jinja):
        with open(jinja) as f:
            return f.read()
    if os.path.exists(js):
        with open(js) as f:
            return json.load(f)["chat_template"]
    raise TemplateError(f"{folder}: the tokenizer has no chat template and the folder has no "
                        "chat_template.jinja or chat_template.json")
