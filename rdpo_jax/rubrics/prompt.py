"""The rubric prompt every model judge uses (the OpenAI-compatible and the local Flax judge alike), and
its version: part of every cached verdict's key, so that a changed prompt never gets a stale verdict."""

from __future__ import annotations

from rdpo_jax.rubrics.judge import Item

PROMPT_VERSION = "rdpo-rubric-judge-v1"


def instruction_text(messages: list[dict]) -> str:
    parts = []
    for m in messages:
        content = m["content"]
        text = content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")
        parts.append(f"{m['role']}: {text}")
    return "\n".join(parts)


def judge_messages(item: Item) -> list[dict]:
    """Chat messages asking a (vision-language) judge for one verdict per criterion, as JSON.

    Images come first as image parts (the HTTP judge turns them into data URLs)."""
    criteria = "\n".join(
        f'- id "{c["id"]}" ({c["kind"]}, scale {"0 or 1" if c["scale"] == "binary" else "1 to 5"}): {c["text"]}'
        for c in item.rubric["criteria"])
    reference = f"\nA reference answer (for you only):\n{item.reference_answer}\n" if item.reference_answer else ""
    text = (
        "You grade an assistant's answer to a question about the image(s) with a rubric, criterion by "
        f"criterion.\n\nConversation:\n{instruction_text(item.messages)}\n{reference}\nAnswer to grade:\n"
        f"{item.answer}\n\nCriteria:\n{criteria}\n\nReply with JSON only, exactly one entry per criterion id:\n"
        '{"verdicts": [{"id": "<criterion id>", "score": <number on its scale>, "reason": "<one short sentence>"}]}')
    return [{"role": "user", "content": [{"type": "image"} for _ in item.images] + [{"type": "text", "text": text}]}]
