"""The local Flax judge: the rubric prompt through the model's chat template, greedy replies, strict parsing."""

import json
import shutil

import jax
import numpy as np

from rdpo_jax import inference, sampling, testing
from rdpo_jax.rubrics.judge import Item
from rdpo_jax.rubrics.local import FlaxJudge
from rdpo_jax.rubrics.prompt import judge_messages

RUBRIC = {"criteria": [{"id": "colour", "text": "names the red circle", "kind": "essential", "weight": 1.0,
                        "scale": "binary"}]}


def _png():
    return testing.png(np.random.default_rng(0), (20, 20))


def test_flax_judge_prompts_decodes_and_parses_strictly(smoke_dir):
    folder = f"{smoke_dir}/model"
    judge = FlaxJudge(inference.load(folder), name="smoke", max_new_tokens=6, batch_size=2)
    cfg = judge.policy.config
    items = [Item(f"s{i}", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}],
                  [_png()], RUBRIC, answer) for i, answer in enumerate(["a red circle", "a blue square", "no"])]
    prompt = judge.tok.prompt(judge_messages(items[0]), [cfg.image_seq_len])
    assert prompt.count(cfg.image_token_id) == cfg.image_seq_len  # the image goes to the judge model too
    words = judge.tok.tokenizer.decode(prompt, skip_special_tokens=True)
    assert "red circle" in words and "describe" in words  # the answer and the conversation are in the prompt
    replies = judge.replies(items[:2])
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    assert replies == judge.replies(items[:2])  # greedy: deterministic
    verdicts = judge.judge(items)
    # a random tiny model cannot write JSON: every item is unscorable, with the parser's reason
    assert [v.unscorable for v in verdicts] == ["invalid verdict: no JSON object in the reply"] * 3
    assert judge.stats == {"judged": 0, "unscorable": 3} and judge.name == "flax:smoke"


def test_flax_judge_takes_text_only_items_in_a_batch_with_images(smoke_dir):
    folder = f"{smoke_dir}/model"
    judge = FlaxJudge(inference.load(folder), name="smoke", max_new_tokens=6, batch_size=2)
    cfg = judge.policy.config
    image = Item("i", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}],
                 [_png()], RUBRIC, "a red circle")
    text = Item("t", [{"role": "user", "content": "name a red shape"}], [], RUBRIC, "a red circle")
    assert cfg.image_token_id not in judge.tok.prompt(judge_messages(text), [])
    # grouped by image count (pixels None for the text-only group), replies in item order: each the
    # same as that item's reply alone
    alone = {item.key: judge.replies([item])[0] for item in (text, image)}
    assert alone["t"] != alone["i"]  # so that a mix-up of rows would show
    assert judge.replies([text, image, text]) == [alone["t"], alone["i"], alone["t"]]


def test_flax_judge_stops_on_every_stop_id_of_the_tokenizer(smoke_dir, tmp_path):
    """A reply ends at the first token of any stop id the tokenizer names, not only eos: the model folder's
    generation_config.json adds one (as Qwen's <|im_end|> or Llama's <|eot_id|>), a token of the greedy
    reply; the judge's decoding (the sampler with the judge's settings) then ends just after it."""
    item = Item("i", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}],
                [_png()], RUBRIC, "a red circle")
    judge = FlaxJudge(inference.load(f"{smoke_dir}/model"), name="smoke", max_new_tokens=6, batch_size=2)
    prompt = {"messages": judge_messages(item), "images": item.images}
    text, ids, stopped = sampling.answer(judge.policy, [prompt] * 2, judge.cfg, jax.random.key(0))[0][0]
    assert judge.replies([item]) == [text] and not stopped and len(ids) == 6
    k = max(i for i, t in enumerate(ids) if t not in ids[:i])  # the last token that is new in the reply
    assert k > 0 and ids[k] not in judge.cfg.stop_ids
    folder = tmp_path / "model"
    shutil.copytree(f"{smoke_dir}/model", folder)
    eos = judge.tok.tokenizer.eos_token_id
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, ids[k]]}))
    cut = FlaxJudge(inference.load(str(folder)), name="smoke", max_new_tokens=6, batch_size=2)
    _, cut_ids, stopped = sampling.answer(cut.policy, [prompt] * 2, cut.cfg, jax.random.key(0))[0][0]
    assert cut_ids == ids[:k + 1] and stopped
    assert cut.replies([item]) == [judge.tok.tokenizer.decode(cut_ids, skip_special_tokens=True).strip()]


def test_flax_judge_with_a_qwen_model(qwen_smoke_dir):
    """A Qwen2.5-VL judge: the image expands to its grid's tokens between vision start and end, and items
    with and without images reply as they do alone."""
    judge = FlaxJudge(inference.load(f"{qwen_smoke_dir}/model"), name="qwen", max_new_tokens=6, batch_size=2)
    cfg = judge.policy.config
    image = Item("i", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}],
                 [_png()], RUBRIC, "a red circle")
    text = Item("t", [{"role": "user", "content": "name a red shape"}], [], RUBRIC, "a red circle")
    prepared = judge.policy.image_input.prepare(image.images)
    prompt = judge.tok.prompt(judge_messages(image), prepared["tokens"])
    # a 20×20 image resizes to 16×16 (sides round to multiples of 8, half to even): 4×4 patches, 4 tokens
    assert prepared["grids"] == [(1, 4, 4)] and prompt.count(cfg.image_token_id) == 4
    start = prompt.index(cfg.vision_start_token_id)
    assert prompt[start + 1:start + 6] == [cfg.image_token_id] * 4 + [cfg.vision_end_token_id]
    alone = {item.key: judge.replies([item])[0] for item in (text, image)}
    assert judge.replies([text, image]) == [alone["t"], alone["i"]]
    assert {v.unscorable for v in judge.judge([image, text])} == {"invalid verdict: no JSON object in the reply"}
