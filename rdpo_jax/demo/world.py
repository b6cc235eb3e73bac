"""A visual world with ground truth: coloured shapes on a 2×2 grid, questions about them, rubrics from
the scene graph, and the imperfect captions the demo's policy is warm-started on.

A scene is 1–3 objects, each {shape, colour, size, position} with a distinct grid cell. Everything is
drawn from a seeded numpy generator, so a seed gives the same scenes, images and texts everywhere.
Question kinds (the prompt id starts with the kind): two open ones, describe and list (the objects of a
colour), whose rubrics hold several essential and additional criteria, and five short ones, count,
colour, shape, presence, where, whose answers restate what is asked, describe the scene tagging each
object with the attributes asked about, each checked where it is written ("blue same square yes": is it
the one asked about?), and then give a one-word final answer (their rubric: the description's criteria
and the final answer; the outcome miner sees only the latter). Each comparison sits next to the word it
compares: with a bare "yes" after the object, the demo's policy compared shapes but never colours.
Ground truth is written in the keys `rubrics.generate.rule_rubric` understands, so the rubric pool comes
from the ordinary `data_prep.build_rubrics --generator=rule` and the judge is the ordinary verifier.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np

from rdpo_jax import testing

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 50, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (235, 210, 40)}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
KINDS = ("describe", "list", "count", "colour", "shape", "presence", "where")
OPEN_KINDS = ("describe", "list")
MARKER = "answer :"  # a short answer's final answer follows it (the verifier reads it there)
IMAGE_SIZE = 48
MAX_OBJECTS = 3  # of the 4 grid cells
PATCH = 12  # 2×2 vision patches per grid cell (16 image tokens): each patch sees a quarter of an object
# (Qwen2.5-VL: patches of 12 px merged 2×2, so again one image token per grid cell)
# Kinds of mistakes in the imperfect share of the SFT answers (describe: each with this weight).
MISTAKES = ("hallucinate", "omit", "recolour", "miscount")


def scene(rng: np.random.Generator) -> list[dict]:
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.permutation(4)[:n]
    return [dict(shape=SHAPES[rng.integers(3)], colour=list(COLOURS)[rng.integers(4)],
                 size=SIZES[rng.integers(2)], position=POSITIONS[c]) for c in sorted(cells)]


def draw(objects: list[dict], rng: np.random.Generator) -> bytes:
    """A PNG of the scene: each object centred (with a pixel of jitter) in its cell, on a dark background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (30, 30, 30))
    pen = ImageDraw.Draw(image)
    cell = IMAGE_SIZE // 2
    for o in objects:
        row, col = (o["position"].startswith("bottom"), o["position"].endswith("right"))
        half = (9 if o["size"] == "large" else 5) + int(rng.integers(0, 2))
        cx = col * cell + cell // 2 + int(rng.integers(-1, 2))
        cy = row * cell + cell // 2 + int(rng.integers(-1, 2))
        colour = tuple(int(np.clip(c + rng.integers(-10, 11), 0, 255)) for c in COLOURS[o["colour"]])
        box = (cx - half, cy - half, cx + half, cy + half)
        if o["shape"] == "circle":
            pen.ellipse(box, fill=colour)
        elif o["shape"] == "square":
            pen.rectangle(box, fill=colour)
        else:
            pen.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _phrase(o: dict) -> str:
    return f"a {o['size']} {o['colour']} {o['shape']} at the {o['position']}"


def _there(n: int, noun: str) -> str:
    plural = noun if n == 1 else noun + "s"
    return f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {plural}"


def describe(objects: list[dict]) -> str:
    return f"{_there(len(objects), 'object')} : " + " and ".join(_phrase(o) for o in objects) + " ."


def _listing(listed: list[dict], colour: str, n: int | None = None) -> str:
    """"there are two red objects : a small red circle at … and …" (`n`: the count stated)."""
    n = len(listed) if n is None else n
    return f"{_there(n, colour + ' object')} : " + " and ".join(_phrase(o) for o in listed) + " ."


def question(objects: list[dict], kind: str, rng: np.random.Generator) -> tuple[str, str, dict]:
    """(instruction, correct answer, ground truth for rule_rubric) of one question of `kind`. A short
    question's answer restates what it asks about, describes the scene tagging each object (`_tag`), then
    gives its final answer after "answer :" (the verifier reads the final answer there; the description's
    criteria are the describe rubric's)."""
    if kind in OPEN_KINDS:
        return _open(objects, kind, rng)
    instruction, final, options, asked = _closed(objects, kind, rng)
    _, _, truth = _open(objects, "describe", rng, exclude=_restated(asked))
    # the restatement, the tags and the final answer (one word or a position) name no object the
    # description's criteria look for; the asked object, absent or not, is no pitfall
    truth = dict(truth, answer=final, options=options, answer_after=MARKER,
                 max_words=truth["max_words"] + 6 + 3 * len(objects))
    return instruction, f"{_tagged(objects, asked)} {MARKER} {final} .", truth


def _restated(asked: dict) -> str:
    """What a short question asks about: "blue square", "square" (count, colour), "blue object" (shape)."""
    return f"{asked['colour']} {asked.get('shape', 'object')}" if "colour" in asked else asked["shape"]


def _checks(o: dict, asked: dict) -> dict:
    """Whether each attribute asked about (colour, then shape) is the object's."""
    return {k: o[k] == v for k, v in asked.items()}


def _tag(o: dict, checks: dict) -> str:
    """"blue yes", "square no", "blue same square yes": each attribute asked about, as the object has it,
    then whether it matches ("same" / "other" before the last one); the last word says whether the object
    is the one asked about (every attribute matches)."""
    words = []
    for i, (k, same) in enumerate(checks.items()):
        last = i == len(checks) - 1
        words += [o[k], ("yes" if all(checks.values()) else "no") if last else ("same" if same else "other")]
    return " ".join(words)


def _tagged(objects: list[dict], asked: dict, n: int | None = None, checks: list[dict] | None = None) -> str:
    """"blue square : there are two objects : a small red circle at the top left , red other circle no and
    … , blue same square yes ." (`n`: the count stated; `checks`: the tags given, by default the truth)."""
    checks = [_checks(o, asked) for o in objects] if checks is None else checks
    return (f"{_restated(asked)} : {_there(len(objects) if n is None else n, 'object')} : "
            + " and ".join(f"{_phrase(o)} , {_tag(o, c)}" for o, c in zip(objects, checks)) + " .")


def _open(objects: list[dict], kind: str, rng: np.random.Generator, exclude: str = "") -> tuple[str, str, dict]:
    """(instruction, answer, ground truth) of an open question; `exclude`: an object no pitfall names."""
    if kind == "describe":
        present = {(o["colour"], o["shape"]) for o in objects}
        others = [f"{c} {s}" for c in COLOURS for s in SHAPES if (c, s) not in present and f"{c} {s}" != exclude]
        absent = [others[i] for i in rng.permutation(len(others))[:2]]
        mentions = sorted({f"{o['colour']} {o['shape']}" for o in objects})
        details = sorted({f"{o['size']} {o['colour']} {o['shape']}" for o in objects}
                         | {f"{o['colour']} {o['shape']} at the {o['position']}" for o in objects})
        truth = dict(counts={"object": len(objects)}, mentions=mentions, details=details, absent=absent,
                     max_words=6 + 9 * len(objects))
        return "describe the image .", describe(objects), truth
    colour = objects[rng.integers(len(objects))]["colour"]
    listed = [o for o in objects if o["colour"] == colour]
    # pitfalls: the scene's objects of other colours (listing them is the plausible mistake), then
    # objects of this colour that are not there
    present = {(o["colour"], o["shape"]) for o in objects}
    others = sorted({f"{o['colour']} {o['shape']}" for o in objects if o["colour"] != colour})
    missing = [f"{colour} {s}" for s in SHAPES if (colour, s) not in present]
    absent = (others + [missing[i] for i in rng.permutation(len(missing))])[:2]
    truth = dict(counts={"object": len(listed)}, mentions=sorted({f"{o['colour']} {o['shape']}" for o in listed}),
                 details=sorted({f"{o['size']} {o['colour']} {o['shape']}" for o in listed}
                                | {f"{o['colour']} {o['shape']} at the {o['position']}" for o in listed}),
                 absent=absent, max_words=6 + 9 * len(listed))
    return f"list the {colour} objects .", _listing(listed, colour), truth


def _closed(objects: list[dict], kind: str, rng: np.random.Generator) -> tuple[str, str, list[str], dict]:
    """(instruction, final answer, its options, what it asks about: the attributes the tagged objects match)."""
    if kind == "count":
        shape = SHAPES[rng.integers(3)]
        return (f"how many {shape}s are there ?", NUMBER_WORDS[sum(o["shape"] == shape for o in objects)],
                list(NUMBER_WORDS), {"shape": shape})
    unique = [o for o in objects if sum(p["shape"] == o["shape"] for p in objects) == 1]
    if kind == "colour" and unique:
        o = unique[rng.integers(len(unique))]
        return f"what colour is the {o['shape']} ?", o["colour"], list(COLOURS), {"shape": o["shape"]}
    unique_colour = [o for o in objects if sum(p["colour"] == o["colour"] for p in objects) == 1]
    if kind == "shape" and unique_colour:
        o = unique_colour[rng.integers(len(unique_colour))]
        return f"what shape is the {o['colour']} object ?", o["shape"], list(SHAPES), {"colour": o["colour"]}
    if kind == "where":
        o = objects[rng.integers(len(objects))]
        if sum((p["colour"], p["shape"]) == (o["colour"], o["shape"]) for p in objects) == 1:
            return (f"where is the {o['colour']} {o['shape']} ?", o["position"], list(POSITIONS),
                    {"colour": o["colour"], "shape": o["shape"]})
    # presence (also the fallback when the scene has no object the other kinds can ask about)
    if rng.random() < 0.5:
        o = objects[rng.integers(len(objects))]
        colour, shape = o["colour"], o["shape"]
    elif rng.random() < 0.5:  # a shape that is there in another colour: only the colours tell
        o = objects[rng.integers(len(objects))]
        colour, shape = [c for c in COLOURS if c != o["colour"]][rng.integers(3)], o["shape"]
    else:
        colour, shape = list(COLOURS)[rng.integers(4)], SHAPES[rng.integers(3)]
    yes = any((p["colour"], p["shape"]) == (colour, shape) for p in objects)
    return f"is there a {colour} {shape} ?", "yes" if yes else "no", ["yes", "no"], {"colour": colour, "shape": shape}


def _mistaken(objects: list[dict], truth: dict, rng: np.random.Generator) -> tuple[list[dict], int]:
    """A mistaken reading of the scene (one of MISTAKES): the objects described and the count stated."""
    mistake = MISTAKES[rng.integers(len(MISTAKES))]
    objs = [dict(o) for o in objects]
    if mistake == "hallucinate" or (mistake == "omit" and len(objs) == 1):
        free = [p for p in POSITIONS if p not in {o["position"] for o in objs}] or list(POSITIONS)
        colour, shape = truth["absent"][0].split()  # an object the rubric's pitfall criterion names
        extra = dict(shape=shape, colour=colour, size=SIZES[rng.integers(2)], position=free[rng.integers(len(free))])
        return objs + [extra], len(objs)  # the count stays right: the caption lists an object that is not there
    if mistake == "omit":
        drop = rng.integers(len(objs))
        return [o for i, o in enumerate(objs) if i != drop], len(objs) - 1
    if mistake == "recolour":
        i = rng.integers(len(objs))
        objs[i]["colour"] = [c for c in COLOURS if c != objs[i]["colour"]][rng.integers(3)]
        return objs, len(objs)
    return objs, len(objs) + 1 if len(objs) == 1 or rng.random() < 0.5 else len(objs) - 1  # 1–3 objects: "four" at most


def _asked_from(restated: str) -> dict:
    """The inverse of `_restated`."""
    words = restated.split()
    if len(words) == 1:
        return {"shape": words[0]}
    return {"colour": words[0]} if words[1] == "object" else {"colour": words[0], "shape": words[1]}


def _final_from(kind: str, objects: list[dict], checks: list[dict]) -> str | None:
    """The final answer the tags (`_checks` per object) lead to (None: they name no object)."""
    tagged = [o for o, c in zip(objects, checks) if all(c.values())]
    if kind in ("presence", "count"):
        return ("yes" if tagged else "no") if kind == "presence" else NUMBER_WORDS[len(tagged)]
    return tagged[0][{"colour": "colour", "shape": "shape", "where": "position"}[kind]] if tagged else None


def imperfect(objects: list[dict], kind: str, answer: str, truth: dict, rng: np.random.Generator) -> str:
    """A plausible wrong answer of the kinds VLMs give: hallucinated, omitted or recoloured objects,
    wrong counts; for short answers, an attribute checked wrong (half of them) or a mistaken description, the
    final answer following the tags either way (the SFT answers never contradict their own tags)."""
    if kind == "describe":
        objs, n = _mistaken(objects, truth, rng)
        return f"{_there(n, 'object')} : " + " and ".join(_phrase(o) for o in objs) + " ."
    if kind == "list":
        colour = truth["mentions"][0].split()[0]  # "red circle": the colour asked about
        listed = [o for o in objects if o["colour"] == colour]
        others = [o for o in objects if o["colour"] != colour]
        mistake = ("include", "omit", "miscount")[rng.integers(3)]
        if mistake == "include" and others:  # an object of another colour listed too, the count kept
            return _listing(listed + [others[rng.integers(len(others))]], colour, len(listed))
        if mistake in ("include", "omit") and len(listed) > 1:
            drop = rng.integers(len(listed))
            return _listing([o for i, o in enumerate(listed) if i != drop], colour)
        return _listing(listed, colour, len(listed) + 1)
    asked = _asked_from(answer.split(" : ")[0])
    truths = [_checks(o, asked) for o in objects]

    def misread(i: int, k: str) -> list[dict]:
        return [dict(c, **{k: not c[k]}) if j == i else c for j, c in enumerate(truths)]

    flips = [(i, k) for i in rng.permutation(len(objects)) for k in asked
             if _final_from(kind, objects, misread(i, k)) not in (None, truth["answer"])]
    if rng.random() < 0.5 and flips:  # misread: one attribute of one object checked wrong, the final answer follows
        checks = misread(*flips[rng.integers(len(flips))])
        return f"{_tagged(objects, asked, checks=checks)} {MARKER} {_final_from(kind, objects, checks)} ."
    # the description goes wrong and the final answer follows it: right where the mistake spares the asked
    # object (then only the rubric sees it), wrong where it does not
    objs, n = _mistaken(objects, truth, rng)
    final = _final_from(kind, objs, [_checks(o, asked) for o in objs])
    if final is None:  # the asked object is not in the description: some other option
        wrong = [o for o in truth["options"] if o != truth["answer"]]
        final = wrong[rng.integers(len(wrong))]
    return f"{_tagged(objs, asked, n)} {MARKER} {final} ."


def example(rng: np.random.Generator, kind: str | None = None) -> dict:
    objects = scene(rng)
    kind = kind or KINDS[rng.integers(len(KINDS))]
    instruction, answer, truth = question(objects, kind, rng)
    if instruction.startswith("is there") and kind != "presence":
        kind = "presence"
    return dict(objects=objects, kind=kind, instruction=instruction, answer=answer, truth=truth,
                image=draw(objects, rng))


def messages(instruction: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]


# ----- Files: model folder, SFT data, prompt files for build_rubrics -----

def corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Texts covering the world's vocabulary: every question and answer form, correct and imperfect."""
    rng = np.random.default_rng(seed)
    texts = ["user assistant system"]
    for i in range(n):
        objects = scene(rng)
        kind = KINDS[i % len(KINDS)]
        instruction, answer, truth = question(objects, kind, rng)
        texts += [instruction, answer, imperfect(objects, kind, answer, truth, rng)]
    return texts


def write_model(folder: str, *, seed: int = 0, family: str = "llava") -> None:
    """The demo's base model as a Hugging Face folder: the family's tiny model 128 wide and 3 deep (a
    SigLIP + Qwen2 LLaVA, or a Qwen2.5-VL of the same widths; random weights, tied embeddings) whose
    images are 48 px in 12 px patches, a word-level tokenizer trained on `corpus()` and the family's
    processor."""
    testing.write_model(folder, testing.tokenizer(texts=corpus(), family=family), family=family, seed=seed,
                        images=dict(image_size=IMAGE_SIZE, patch_size=PATCH), width=128, depth=3, tied=True)


def write_sft(out: str, name: str, *, n: int, seed: int, imperfect_share: float) -> dict:
    """`n` SFT examples over every question kind; `imperfect_share` of them answered with a mistake."""
    from rdpo_jax.data import arrayrecord

    rng = np.random.default_rng(seed)
    rows, wrong = [], 0
    for i in range(n):
        e = example(rng, KINDS[i % len(KINDS)])
        answer = e["answer"]
        if rng.random() < imperfect_share:
            answer = imperfect(e["objects"], e["kind"], answer, e["truth"], rng)
            wrong += answer != e["answer"]
        rows.append(dict(example_id=f"{e['kind']}-{i:05d}", images=[e["image"]], messages=messages(e["instruction"]),
                         answer=answer))
    arrayrecord.write(out, name, "sft", rows)
    return {"examples": n, "imperfect": wrong}


def write_prompts(folder: str, name: str, *, n: int, seed: int, open_share: float = len(OPEN_KINDS) / len(KINDS)) -> str:
    """`n` prompts (image files + NAME.jsonl with ground truth) for `data_prep.build_rubrics`:
    `open_share` of them open questions (describe and list in turn), the rest the short kinds in turn."""
    rng = np.random.default_rng(seed)
    short = [k for k in KINDS if k not in OPEN_KINDS]
    opened = 0
    image_dir = os.path.join(folder, f"{name}_images")
    os.makedirs(image_dir, exist_ok=True)
    path = os.path.join(folder, f"{name}.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            open_ended = int((i + 1) * open_share) > int(i * open_share)
            if open_ended:
                opened += 1
            e = example(rng, OPEN_KINDS[(opened - 1) % len(OPEN_KINDS)] if open_ended else short[(i - opened) % len(short)])
            image = f"{name}_images/{i:05d}.png"
            with open(os.path.join(folder, image), "wb") as img:
                img.write(e["image"])
            f.write(json.dumps(dict(prompt_id=f"{e['kind']}-{i:05d}", image=image, instruction=e["instruction"],
                                    reference_answer=e["answer"], ground_truth=e["truth"], scene=e["objects"])) + "\n")
    return path
