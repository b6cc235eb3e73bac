"""A local Flax model as judge: any model `inference.load` reads, prompted with the rubric prompt of
`prompt.py`, decoded greedily on the local devices (items with and without images alike), its reply
parsed strictly like the HTTP judge's."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from rdpo_jax import sampling
from rdpo_jax.data.tokenize import TemplateError
from rdpo_jax.rubrics.judge import Item, JudgeOutputError, Verdict
from rdpo_jax.rubrics.parse import parse_verdict
from rdpo_jax.rubrics.prompt import judge_messages


class FlaxJudge:
    """`policy` (an `inference.Policy`: the judge model on its mesh, its tokenizer and image
    preprocessing) answering the rubric prompt greedily."""

    def __init__(self, policy, *, name: str, max_new_tokens: int = 512, batch_size: int = 8, pad_to: int = 64):
        self.policy, self.name, self.batch_size, self.pad_to = policy, f"flax:{name}", batch_size, pad_to
        self.tok = policy.tokenizer
        # eos, generation_config's eos ids and the template's end-of-turn: a chat model may end its
        # reply with any of them, and decoding past it wastes steps and appends text to the JSON
        self.cfg = policy.sampling_config(max_new_tokens=max_new_tokens, temperature=0.0)
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
        prompts = [{"messages": judge_messages(item), "images": item.images} for item in items]
        with jax.set_mesh(self.policy.mesh):
            rows = sampling.answer(self.policy, prompts, self.cfg, jax.random.key(0), pad_to=self.pad_to)
        return [rows[i][0][0] for i in range(n)]

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
