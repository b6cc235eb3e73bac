"""Chat-template tokenization against the HF processor of a tiny model made in the test, and against
real tokenizer kinds (Llama-2/LLaVA-1.5, Metaspace, Qwen2 byte-level, Llama-3) trained in the test."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from data_prep import smoke
from rdpo_jax import packing, testing
from rdpo_jax.data.tokenize import ChatTokenizer, TemplateError
from tests import tiny, tokenizers

MESSAGES = [{"role": "system", "content": "answer yes or no"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a red circle"}]}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    tiny.processor("clip_llama").save_pretrained(path)  # CLIP + `default` strategy: 16 image tokens
    return path


def _tok(folder):
    return ChatTokenizer(folder, image_token_id=tiny.IMAGE_TOKEN)


def test_prompt_matches_processor_apply_chat_template(folder):
    processor = tiny.processor("clip_llama")
    image = Image.fromarray(np.zeros((40, 50, 3), np.uint8))
    with_image = [MESSAGES[0], {"role": "user", "content": [{"type": "image", "image": image},
                                                            {"type": "text", "text": "is there a red circle"}]}]
    expected = processor.apply_chat_template(with_image, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"][0]
    ids = _tok(folder).prompt(MESSAGES, [16])
    assert ids == list(expected)
    assert ids.count(tiny.IMAGE_TOKEN) == 16  # the placeholder expands to the model's image tokens
    assert ids[-2:] == [1, smoke.WORDS.index("assistant") + len(testing.SPECIAL)]  # "<|im_start|>assistant"


def test_answer_ends_with_end_of_turn_and_is_the_only_trained_part(folder):
    tok = _tok(folder)
    answer = tok.answer(MESSAGES, "yes there is a red circle")
    words = ["yes", "there", "is", "a", "red", "circle"]
    assert answer == [smoke.WORDS.index(w) + len(testing.SPECIAL) for w in words] + [2]  # <|im_end|> = 2
    prompt = tok.prompt(MESSAGES, [16])
    batch, _ = packing.pack([packing.Group(prompt, [answer], ())], layout="sft", seq_len=len(prompt) + 10,
                            max_answer_len=10)
    trained = batch.targets[0][batch.target_branch[0] > 0]
    np.testing.assert_array_equal(trained, answer)  # the loss sees the answer and its end of turn, nothing else
    # the prompt + answer ids are what the chat template renders for the whole conversation
    full = tok.tokenizer.apply_chat_template(MESSAGES + [{"role": "assistant", "content": " ".join(words)}],
                                             tokenize=False)
    expanded = [t for x in tok._ids(full) for t in ([x] * 16 if x == tiny.IMAGE_TOKEN else [x])]
    assert expanded[:len(prompt) + len(answer)] == prompt + answer


def test_image_count_mismatch_and_template_errors(folder):
    tok = _tok(folder)
    with pytest.raises(TemplateError, match="holds 1 image tokens for 2 images"):
        tok.prompt(MESSAGES, [16, 16])
    with pytest.raises(TemplateError, match="the answer contains the image token"):
        tok.answer(MESSAGES, "the <image> again")


def test_picklable_without_the_loaded_tokenizer(folder):
    import pickle

    tok = _tok(folder)
    tok.prompt(MESSAGES, [16])
    clone = pickle.loads(pickle.dumps(tok))
    assert clone._tok is None and clone.prompt(MESSAGES, [16]) == tok.prompt(MESSAGES, [16])


# --- real tokenizer kinds (tests/tokenizers.py): answers continue the prompt's ids -----------------------

CONVERSATIONS = [  # (messages, answer): one image turn, a system message, a second turn
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a red circle"}]}],
     "There are two red circles and a blue square."),
    ([{"role": "system", "content": "answer yes or no"},
      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a red circle"}]}],
     "Yes, there is a red circle on the left."),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]},
      {"role": "assistant", "content": "the picture shows a green triangle"},
      {"role": "user", "content": [{"type": "text", "text": "how many objects are there"}]}],
     "No, the picture shows three objects."),
]
END_OF_TURN = {"llama2": "</s>", "metaspace": "</s>", "qwen2": "<|im_end|>", "llama3": "<|eot_id|>"}
PREFIX_SPACES = ("▁", "Ġ")  # a lone SentencePiece / byte-level space


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    return {kind: tokenizers.build(kind, str(tmp_path_factory.mktemp(kind))) for kind in tokenizers.KINDS}


def _real(kinds, kind):
    return ChatTokenizer(kinds[kind], image_token_id=tokenizers.IMAGE_TOKEN)


@pytest.mark.parametrize("kind", tokenizers.KINDS)
@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_answer_ids_are_what_follows_the_prompt(kinds, kind, case):
    tok = _real(kinds, kind)
    messages, text = CONVERSATIONS[case]
    answer = tok.answer(messages, text)
    hf = tok.tokenizer
    assert hf.convert_ids_to_tokens(answer[0]) not in PREFIX_SPACES  # no stray space before the answer
    assert hf.decode(answer, skip_special_tokens=True).strip() == text
    assert answer[-1] == hf.convert_tokens_to_ids(END_OF_TURN[kind]) and answer[-1] in tok.stop_ids()
    # The whole conversation's ids start with the prompt's (before image expansion) for these templates,
    # and the answer is exactly their continuation (up to trailing whitespace after the end of turn).
    prompt = tok._ids(tok._render(messages, True))
    full = tok._ids(tok._render(messages + [{"role": "assistant", "content": text}], False))
    assert full[:len(prompt)] == prompt
    assert full[len(prompt):len(prompt) + len(answer)] == answer
    assert hf.decode(full[len(prompt) + len(answer):]).strip() == ""
    expanded = tok.prompt(messages, [4])
    assert len(expanded) == len(prompt) + 3  # the one placeholder became the image's 4 tokens


def test_old_way_gives_llama2_answers_a_stray_prefix_space(kinds):
    """Tokenizing the answer's text alone (the old way) prepends a second "▁" to it: the test is meaningful."""
    tok = _real(kinds, "llama2")
    messages, text = CONVERSATIONS[0]
    prompt = tok._render(messages, True)
    full = tok._render(messages + [{"role": "assistant", "content": text}], False)
    old = tok._ids(full[len(prompt):].rstrip())
    new = tok.answer(messages, text)
    assert new != old and tok.tokenizer.convert_ids_to_tokens(old[0]) == "▁" and old[1:] == new


def test_token_straddling_the_prompt_end(kinds):
    """Answer whitespace merged into the prompt's last token is dropped; answer text merged is an error."""
    tok = _real(kinds, "qwen2")
    messages, text = CONVERSATIONS[0]
    # "assistant\n" + "\nThere…": "\n\n" is one token that starts in the prompt.
    assert tok.answer(messages, "\n" + text) == tok.answer(messages, text)
    tok = _real(kinds, "llama2")
    # A generation prompt without the colon the assistant turn has: "T:" is one token across the prompt's end.
    tok.tokenizer.chat_template = tokenizers.TEMPLATES["llama2"].replace("{{ 'ASSISTANT:' }}", "").replace(
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}", "{% if add_generation_prompt %}ASSISTANT{% endif %}")
    assert "T:" in tok.tokenizer.convert_ids_to_tokens(tok._ids("ASSISTANT: There"))
    with pytest.raises(TemplateError, match="merges into the prompt's last token"):
        tok.answer(messages, text)


@pytest.mark.parametrize("kind", tokenizers.KINDS)
def test_stop_ids_hold_eos_and_the_end_of_turn(kinds, kind):
    tok = _real(kinds, kind)
    tokens = {"llama2": ["</s>"], "metaspace": ["</s>"],
              "qwen2": ["<|im_end|>", "<|endoftext|>"],  # the template's and generation_config.json's
              "llama3": ["<|eot_id|>", "<|end_of_text|>"]}[kind]
    expected = tuple(sorted(tok.tokenizer.convert_tokens_to_ids(tokens)))
    assert tok.stop_ids() == expected
    if kind == "llama3":  # the end of turn is not the eos token, but generation must stop on it
        assert tok.tokenizer.convert_tokens_to_ids("<|eot_id|>") != tok.tokenizer.eos_token_id


def test_stop_ids_of_the_tiny_tokenizer_and_generation_config(folder, kinds, tmp_path):
    assert _tok(folder).stop_ids() == (2,)  # <|im_end|>: eos and end of turn
    copy = shutil.copytree(kinds["metaspace"], tmp_path / "metaspace")
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    tok = ChatTokenizer(str(copy), image_token_id=tokenizers.IMAGE_TOKEN)
    assert tok.stop_ids() == (2, 7)


def test_an_end_of_turn_that_is_no_added_token_is_not_a_stop(kinds):
    tok = _real(kinds, "llama2")
    tok.tokenizer.chat_template = tokenizers.TEMPLATES["llama2"].replace("</s>", "\n")  # turns end with a newline
    assert tok.stop_ids() == (tok.tokenizer.eos_token_id,)
    tok.tokenizer.chat_template = tokenizers.TEMPLATES["llama2"].replace("</s>", " circle")  # … or a word
    assert tok.stop_ids() == (tok.tokenizer.eos_token_id,)


def test_fingerprint_names_the_tokenizer_files(kinds, tmp_path):
    import pickle

    fingerprints = {kind: _real(kinds, kind).fingerprint for kind in tokenizers.KINDS}
    assert len(set(fingerprints.values())) == len(tokenizers.KINDS)
    assert all(f.startswith("sha256:") for f in fingerprints.values())
    # A copy of the files elsewhere (as an export makes), next to other files, names the same tokenizer.
    copy = shutil.copytree(kinds["qwen2"], tmp_path / "exported")
    (copy / "config.json").write_text("{}")
    tok = ChatTokenizer(str(copy), image_token_id=tokenizers.IMAGE_TOKEN)
    assert tok.fingerprint == fingerprints["qwen2"] == pickle.loads(pickle.dumps(tok)).fingerprint
    (copy / "chat_template.jinja").write_text(tokenizers.TEMPLATES["qwen2"].replace("\n", " "))
    tok = ChatTokenizer(str(copy), image_token_id=tokenizers.IMAGE_TOKEN)  # read once per object
    assert tok.fingerprint != fingerprints["qwen2"]  # the template changes the ids


# --- a think block in the generation prompt: every consumer sees the same prompt ids ---------------------
# Qwen3.5 (thinking off) ends the generation prompt with an empty think block and renders assistant turns
# with it; Qwen3-VL-Thinking opens a think block the answer closes (its reasoning, "</think>", the reply).
# `<think>` / `</think>` are added tokens that are not special, as in Qwen's tokenizers (decoding keeps them).

_CONTENT = ("{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
            "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ p['text'] }}"
            "{% endif %}{% endfor %}{% endif %}")
THINK_TEMPLATES = {
    "empty_think": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                   "<think>\n\n</think>\n\n{% endif %}" + _CONTENT + "<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}",
    # the answered (last) turn splits its content at "</think>" into reasoning and reply, as Qwen3's does
    "open_think": "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}{% set c = m['content'] %}"
                  "{% set r = '' %}{% if '</think>' in c %}{% set r = c.split('</think>')[0].split('<think>')[-1] %}"
                  "{% set c = c.split('</think>')[-1].lstrip('\\n') %}{% endif %}<|im_start|>assistant\n<think>\n"
                  "{{ r.strip('\\n') }}\n</think>\n\n{{ c }}<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n"
                  + _CONTENT + "<|im_end|>\n{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}",
}
THINK_PROMPT_END = {"empty_think": ["assistant", "<think>", "</think>"], "open_think": ["assistant", "<think>"]}
# (chosen, rejected) as the policy writes them after each template's prompt; their tokens + end of turn are
# the answer ids
THINK_ANSWERS = {"empty_think": ("yes there is a red circle", "no"),
                 "open_think": ("a red circle </think> yes there is", "</think> no")}
THINK_MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a red circle"}]}]


@pytest.fixture(scope="module")
def think_folders(tmp_path_factory):
    """{template: a tiny Qwen2.5-VL's folder (config, processor, word-level tokenizer with that template)}."""
    from rdpo_jax.models.qwen2_5_vl import tiny as qwen_tiny

    out = {}
    for name, template in THINK_TEMPLATES.items():
        tok = testing.tokenizer(["user", "assistant", "yes", "no", "is", "there", "a", "red", "circle"],
                                family="qwen2_5_vl")
        tok.add_tokens(["<think>", "</think>"])
        tok.chat_template = template
        folder = str(tmp_path_factory.mktemp(name))
        qwen_tiny.hf_config(tok).save_pretrained(folder)
        qwen_tiny.save_processor(folder, tok)  # writes the tokenizer and its template too
        out[name] = folder
    return out


def _think_tok(folder):
    from rdpo_jax.models import hf

    return ChatTokenizer(folder, image_token_id=hf.read_config(folder).image_token_id)


def _token_ids(tok, text):
    return tok.tokenizer.convert_tokens_to_ids(text.split())


@pytest.mark.parametrize("template", THINK_TEMPLATES)
def test_think_block_ends_the_prompt_and_stays_out_of_the_answer(think_folders, template):
    tok = _think_tok(think_folders[template])
    hf = tok.tokenizer
    prompt = tok.prompt(THINK_MESSAGES, [4])
    end = THINK_PROMPT_END[template]
    assert hf.convert_ids_to_tokens(prompt[-len(end):]) == end
    assert prompt.count(tok.image_token_id) == 4
    eot = hf.convert_tokens_to_ids("<|im_end|>")
    assert tok.stop_ids() == (eot,)
    for text in THINK_ANSWERS[template]:
        answer = tok.answer(THINK_MESSAGES, text)
        assert answer == _token_ids(tok, text) + [eot]  # what the model writes after the prompt, and the end of turn
        assert hf.decode(answer, skip_special_tokens=True) == text  # the sampler's text of those ids
    if template == "empty_think":  # the think block is the prompt's, never trained
        think = set(hf.convert_tokens_to_ids(["<think>", "</think>"]))
        assert not think & set(tok.answer(THINK_MESSAGES, THINK_ANSWERS[template][0]))
    else:  # a reply without reasoning: the template closes the think block, which the model must write
        assert tok.answer(THINK_MESSAGES, "yes") == _token_ids(tok, "</think> yes") + [eot]


@pytest.mark.parametrize("template", THINK_TEMPLATES)
def test_trainer_ref_logps_sampler_and_judge_see_the_same_prompt_ids(think_folders, template, tmp_path):
    """The trainer and ref_logps build batches with `pipeline.make_dataset` over the config's model folder
    (tokenizer, image adapter, options); the sampler and the Flax judge encode and left-pad prompts
    (`sampling.answer` → `ChatTokenizer.encode`, `sampling.collate`). Their rows start (the sampler's end)
    with the same prompt ids and positions, and records with the sampler's ids train what text-only ones do."""
    from configs import smoke as smoke_config
    from rdpo_jax import inference, sampling
    from rdpo_jax.data import arrayrecord, pipeline
    from rdpo_jax.models import hf as hf_lib
    from rdpo_jax.models import image_inputs
    from rdpo_jax.rubrics.judge import Item
    from rdpo_jax.rubrics.prompt import judge_messages

    folder = think_folders[template]
    config = smoke_config.get_config(f"dir={tmp_path},family=qwen2_5_vl")
    config.model.path = folder
    config.data.seq_buckets, config.data.max_images = (64,), 1
    model_config = hf_lib.read_config(folder)
    tok = ChatTokenizer(config.model.path, image_token_id=model_config.image_token_id)  # train._Data's, load's
    image_input = image_inputs.from_config(config, model_config)
    prompt = tok.encode(THINK_MESSAGES, [testing.png(np.random.default_rng(0), (16, 16))], image_input)
    end = tok.tokenizer.convert_tokens_to_ids(THINK_PROMPT_END[template])
    assert list(prompt.ids[-len(end):]) == end and prompt.positions.shape == (3, len(prompt.ids))

    chosen, rejected = THINK_ANSWERS[template]
    rubric = {"criteria": [{"id": "c0", "text": "says yes", "kind": "essential", "weight": 1.0, "scale": "binary"}]}
    record = dict(prompt_id="p", images=[testing.png(np.random.default_rng(0), (16, 16))], messages=THINK_MESSAGES,
                  chosen=chosen, rejected=rejected, rubric=rubric, chosen_scores=[1], rejected_scores=[0], meta={})
    eot = tok.tokenizer.convert_tokens_to_ids("<|im_end|>")
    sampled = dict(chosen_ids=_token_ids(tok, chosen) + [eot], rejected_ids=_token_ids(tok, rejected) + [eot],
                   tokenizer=tok.fingerprint)  # as data_prep.sample generated and make_pairs kept them
    arrayrecord.write(str(tmp_path), "pairs", "pairs", [{**record, "pair_id": "text"},
                                                        {**record, "pair_id": "ids", **sampled}])
    source = arrayrecord.Source(str(tmp_path / "pairs"))
    options = pipeline.Options.from_config(config)
    P = len(prompt.ids)
    for seed, epochs in ((None, 1), (config.data.seed, None)):  # ref_logps's pass, the trainer's
        batch = pipeline.make_dataset(source, options, tok, image_input, global_batch_size=2, seed=seed,
                                      num_epochs=epochs, process_index=0, process_count=1)[0]["batch"]
        assert batch.valid.tolist() == [[1.0], [1.0]]
        for row in range(2):
            np.testing.assert_array_equal(batch.input_ids[row, :P], prompt.ids)
            np.testing.assert_array_equal(batch.positions[row, :, :P], prompt.positions)
            assert (batch.branch_ids[row, :P] == 0).all() and batch.branch_ids[row, P] == 1
            trained = batch.targets[row][batch.target_branch[row] > 0]
            np.testing.assert_array_equal(trained, sampled["chosen_ids"] + sampled["rejected_ids"])
        np.testing.assert_array_equal(batch.input_ids[0], batch.input_ids[1])  # text-only = the sampler's ids

    policy = inference.Policy(None, model_config, folder, None, tok, image_input, None)  # what collate reads
    item = Item("s", THINK_MESSAGES, record["images"], rubric, chosen)
    judge_prompt = tok.encode(judge_messages(item), item.images, image_input)  # FlaxJudge → sampling.answer
    assert list(judge_prompt.ids[-len(end):]) == end
    length = 128
    ids, mask, arrays = sampling.collate(policy, [prompt, judge_prompt], length)
    for row, p in enumerate((prompt, judge_prompt)):
        np.testing.assert_array_equal(ids[row, length - len(p.ids):], p.ids)
        assert mask[row].sum() == len(p.ids)
        np.testing.assert_array_equal(arrays["positions"][row, :, length - len(p.ids):], p.positions)
