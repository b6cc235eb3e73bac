"""Chat-template tokenization: prompt ids (image placeholders expanded) and answer ids (ending the turn).

The model folder's tokenizer renders the conversation with its chat template (the processor's
`chat_template.jinja`/`.json` when the tokenizer has none). The prompt is the conversation rendered with
`add_generation_prompt=True`; the answer is what rendering the conversation plus the assistant message
adds after that prompt, up to and including the end-of-turn token (trailing whitespace dropped). Each
image placeholder token in the prompt expands to exactly `image_seq_len` copies, as the HF processor
does, so the model's image features fill them one to one. Only answer tokens are trained.
"""

from __future__ import annotations

import json
import os

PLACEHOLDER = "image"  # the part type that renders as the image token


class TemplateError(ValueError):
    """The chat template cannot split a conversation into prompt and answer."""


class ChatTokenizer:
    """Picklable (the tokenizer loads lazily in each worker process)."""

    def __init__(self, model_folder: str, *, image_token_id: int, image_seq_len: int):
        self.folder, self.image_token_id, self.image_seq_len = model_folder, image_token_id, image_seq_len
        self._tok = None

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}

    @property
    def tokenizer(self):
        if self._tok is None:
            import transformers

            tok = transformers.AutoTokenizer.from_pretrained(self.folder)
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

    def prompt(self, messages: list[dict], num_images: int) -> list[int]:
        """Token ids of the prompt, image placeholders expanded; checks one placeholder per image."""
        ids = self._ids(self._render(messages, True))
        found = ids.count(self.image_token_id)
        if found != num_images:
            raise TemplateError(f"the rendered prompt holds {found} image tokens for {num_images} images "
                                f"(token id {self.image_token_id})")
        out: list[int] = []
        for t in ids:
            out.extend([t] * self.image_seq_len if t == self.image_token_id else [t])
        return out

    def answer(self, messages: list[dict], answer: str) -> list[int]:
        """Token ids of the assistant's answer to `messages`, ending with the end-of-turn token."""
        prompt = self._render(messages, True)
        full = self._render(messages + [{"role": "assistant", "content": answer}], False)
        if not full.startswith(prompt):
            raise TemplateError("the chat template renders the conversation differently once the answer is "
                                "appended, so prompt and answer cannot be split")
        ids = self._ids(full[len(prompt):].rstrip())
        if self.image_token_id in ids:
            raise TemplateError("the answer contains the image token")
        return ids


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
