"""A local Flax model as judge: any model `load_hf` reads, prompted with the rubric prompt of
`judge.py`, decoded greedily on the local devices (items with and without images alike), its reply
parsed strictly like the HTTP judge's."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rdpo_jax import sampling
from rdpo_jax.data import images as image_lib
from rdpo_jax.data.tokenize import ChatTokenizer, TemplateError
from rdpo_jax.rubrics.judge import Item, JudgeOutputError, Verdict, judge_messages, parse_verdict


class FlaxJudge:
    def __init__(self, model, model_config, folder: str, *, name: str, max_new_tokens: int = 512,
                 batch_size: int = 8, pad_to: int = 64):
        self.model, self.name, self.batch_size, self.pad_to = model, f"flax:{name}", batch_size, pad_to
        self.tok = ChatTokenizer(folder, image_token_id=model_config.image_token_id,
                                 image_seq_len=model_config.image_seq_len)
        self.image_cfg = image_lib.image_config(folder)
        # eos, generation_config's eos ids and the template's end-of-turn: a chat model may end its
        # reply with any of them, and decoding past it wastes steps and appends text to the JSON
        self.cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                                           stop_ids=self.tok.stop_ids(), pad_id=self.tok.pad_id,
                                           suppress_ids=(model_config.image_token_id,))
        self.stats = {"judged": 0, "unscorable": 0}

    def replies(self, items: Sequence[Item]) -> list[str]:
        """The judge model's raw replies (greedy), in item order.

        Items are decoded in groups of equal image count: their images stack into one array, and a
        text-only group passes no pixels at all. Each group's rows are padded (repeating its last item)
        to a multiple of `batch_size`, so that the shapes that compile do not depend on the mix.
        """
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(len(item.images), []).append(i)
        out = [""] * len(items)
        for rows in groups.values():
            for i, reply in zip(rows, self._decode([items[i] for i in rows])):
                out[i] = reply
        return out

    def _decode(self, items: list[Item]) -> list[str]:
        """Greedy replies for items that all have the same number of images."""
        n = len(items)
        items = items + items[-1:] * (-n % self.batch_size)
        prompts = [self.tok.prompt(judge_messages(item), len(item.images)) for item in items]
        length = -(-max(map(len, prompts)) // self.pad_to) * self.pad_to
        ids, mask = sampling.left_pad(prompts, self.tok.pad_id, length)
        pixels = None
        if items[0].images:
            pixels = jnp.asarray(np.stack([np.stack([image_lib.load_and_preprocess(b, self.image_cfg)
                                                     for b in item.images]) for item in items]))
        tokens, lengths = sampling.generate(self.model, jnp.asarray(ids), jnp.asarray(mask), pixels,
                                            jax.random.key(0), self.cfg)
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        return [self.tok.tokenizer.decode(tokens[i, :lengths[i]], skip_special_tokens=True) for i in range(n)]

    def judge(self, items: Sequence[Item]) -> list[Verdict]:
        out = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            try:
                replies = self.replies(chunk)
            except TemplateError as e:
                out += [Verdict.failed(f"prompt: {e}")] * len(chunk)
                self.stats["unscorable"] += len(chunk)
                continue
            for item, reply in zip(chunk, replies):
                try:
                    out.append(parse_verdict(reply, item.rubric))
                    self.stats["judged"] += 1
                except JudgeOutputError as e:
                    out.append(Verdict.failed(f"invalid verdict: {e}"))
                    self.stats["unscorable"] += 1
        return out
