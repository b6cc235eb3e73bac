"""Rubric generators: rule-based from structured ground truth, or a model behind an OpenAI-compatible
endpoint asked for essential and additional criteria as JSON (validated; re-asked when invalid).

Ground truth understood by `rule_rubric` (every key optional):
  answer, options   the final answer of a closed question and its alternatives  → essential
  answer_after      a marker ("answer :"): the final answer is read after its last occurrence only
  counts            {noun: n}: how many of each thing there are                  → essential
  mentions          phrases a complete answer must contain                       → essential
  details           phrases a good answer may add                                → additional
  absent            phrases that would be hallucinations                         → additional
  max_words         a length budget                                              → additional
"""

from __future__ import annotations

from rdpo_jax.data import records
from rdpo_jax.rubrics.http import ChatClient, with_data_urls
from rdpo_jax.rubrics.judge import JudgeOutputError
from rdpo_jax.rubrics.parse import json_object
from rdpo_jax.rubrics.prompt import instruction_text

RUBRIC_PROMPT_VERSION = "rdpo-rubric-writer-v1"
NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()


def _criterion(cid: str, text: str, kind: str, weight: float, check: dict) -> dict:
    return {"id": cid, "text": text, "kind": kind, "weight": float(weight), "scale": "binary", "check": check}


def rule_rubric(gt: dict, *, essential_weight: float = 1.0, additional_weight: float = 0.5) -> dict:
    """An instance-specific, machine-checkable rubric from structured ground truth (see module doc)."""
    criteria = []
    if "answer" in gt:
        criteria.append(_criterion("answer", f"Gives the answer '{gt['answer']}'", "essential", essential_weight * 2,
                                   {"type": "answer", "value": gt["answer"], "options": list(gt.get("options", [])),
                                    **({"after": gt["answer_after"]} if gt.get("answer_after") else {})}))
    for noun, n in sorted(gt.get("counts", {}).items()):
        word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
        criteria.append(_criterion(f"count:{noun}", f"States that there {'is' if n == 1 else 'are'} {word} {noun}",
                                   "essential", essential_weight, {"type": "count", "noun": noun, "value": int(n)}))
    for phrase in gt.get("mentions", []):
        criteria.append(_criterion(f"mentions:{phrase}", f"Mentions the {phrase}", "essential", essential_weight,
                                   {"type": "contains", "phrase": phrase}))
    for phrase in gt.get("details", []):
        criteria.append(_criterion(f"detail:{phrase}", f"Adds the detail '{phrase}'", "additional",
                                   additional_weight, {"type": "contains", "phrase": phrase}))
    for phrase in gt.get("absent", []):
        criteria.append(_criterion(f"absent:{phrase}", f"Does not mention a {phrase}, which is not there",
                                   "additional", additional_weight, {"type": "not_contains", "phrase": phrase}))
    if "max_words" in gt:
        criteria.append(_criterion("concise", f"Uses at most {gt['max_words']} words", "additional",
                                   additional_weight, {"type": "max_words", "value": int(gt["max_words"])}))
    return records.check_rubric({"criteria": criteria}, "rule_rubric")


class RubricGenerationError(RuntimeError):
    pass


class OpenAIRubricGenerator:
    """Asks a model for a rubric; validates it with the record schema; re-asks with the error."""

    def __init__(self, client: ChatClient, *, attempts: int = 3, max_criteria: int = 12):
        self.client, self.attempts, self.max_criteria = client, attempts, max_criteria

    def messages(self, instruction_messages: list[dict], num_images: int, reference: str | None) -> list[dict]:
        ref = f"\nA reference answer:\n{reference}\n" if reference else ""
        text = (
            "Write a grading rubric for answers to this request about the image(s): a checklist of "
            f"criteria specific to this image and request, at most {self.max_criteria}.\n\nRequest:\n"
            f"{instruction_text(instruction_messages)}\n{ref}\nEssential criteria are what a correct answer "
            "cannot miss; additional criteria make an answer better. Reply with JSON only:\n"
            '{"criteria": [{"id": "<short unique id>", "text": "<one checkable statement>", '
            '"kind": "essential" | "additional", "weight": <number > 0>, "scale": "binary" | "1-5"}]}')
        return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}]

    def generate(self, instruction_messages: list[dict], images: list[bytes], reference: str | None = None) -> dict:
        messages = with_data_urls(self.messages(instruction_messages, len(images), reference), images)
        error = None
        for _ in range(self.attempts):
            reply = self.client.complete(messages)
            try:
                rubric = records.check_rubric(json_object(reply, "criteria"), "generated rubric")
                if len(rubric["criteria"]) > self.max_criteria:
                    raise records.RecordError("generated rubric", "criteria", f"more than {self.max_criteria}")
                return rubric
            except (JudgeOutputError, records.RecordError) as e:
                error = e
                messages = messages + [{"role": "assistant", "content": reply or ""}, {"role": "user", "content": (
                    f"That is not a valid rubric: {e}. Reply again with the JSON only.")}]
        raise RubricGenerationError(f"no valid rubric after {self.attempts} attempts: {error}")
