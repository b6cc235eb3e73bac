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
