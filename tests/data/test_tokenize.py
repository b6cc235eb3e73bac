"""Chat-template tokenization against the HF processor of a tiny model made in the test."""

import numpy as np
import pytest
from PIL import Image

from rdpo_jax import packing
from rdpo_jax.data.tokenize import ChatTokenizer, TemplateError
from tests import tiny

MESSAGES = [{"role": "system", "content": "answer yes or no"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a red circle"}]}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    tiny.processor("clip_llama").save_pretrained(path)  # CLIP + `default` strategy: 16 image tokens
    return path


def _tok(folder):
    return ChatTokenizer(folder, image_token_id=tiny.IMAGE_TOKEN, image_seq_len=16)


def test_prompt_matches_processor_apply_chat_template(folder):
    processor = tiny.processor("clip_llama")
    image = Image.fromarray(np.zeros((40, 50, 3), np.uint8))
    with_image = [MESSAGES[0], {"role": "user", "content": [{"type": "image", "image": image},
                                                            {"type": "text", "text": "is there a red circle"}]}]
    expected = processor.apply_chat_template(with_image, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"][0]
    ids = _tok(folder).prompt(MESSAGES, num_images=1)
    assert ids == list(expected)
    assert ids.count(tiny.IMAGE_TOKEN) == 16  # the placeholder expands to the model's image tokens
    assert ids[-2:] == [1, tiny.WORDS.index("assistant") + len(tiny.SPECIAL)]  # "<|im_start|>assistant"


def test_answer_ends_with_end_of_turn_and_is_the_only_trained_part(folder):
    tok = _tok(folder)
    answer = tok.answer(MESSAGES, "yes there is a red circle")
    words = ["yes", "there", "is", "a", "red", "circle"]
    assert answer == [tiny.WORDS.index(w) + len(tiny.SPECIAL) for w in words] + [2]  # <|im_end|> = 2
    prompt = tok.prompt(MESSAGES, 1)
    batch, _ = packing.pack_sft([(prompt, answer)], seq_len=len(prompt) + 10, max_answer_len=10)
    trained = batch["targets"][0][batch["target_branch"][0] > 0]
    np.testing.assert_array_equal(trained, answer)  # the loss sees the answer and its end of turn, nothing else
    # the prompt + answer ids are what the chat template renders for the whole conversation
    full = tok.tokenizer.apply_chat_template(MESSAGES + [{"role": "assistant", "content": " ".join(words)}],
                                             tokenize=False)
    expanded = [t for x in tok._ids(full) for t in ([x] * 16 if x == tiny.IMAGE_TOKEN else [x])]
    assert expanded[:len(prompt) + len(answer)] == prompt + answer


def test_image_count_mismatch_and_template_errors(folder):
    tok = _tok(folder)
    with pytest.raises(TemplateError, match="holds 1 image tokens for 2 images"):
        tok.prompt(MESSAGES, num_images=2)
    with pytest.raises(TemplateError, match="the answer contains the image token"):
        tok.answer(MESSAGES, "the <image> again")


def test_picklable_without_the_loaded_tokenizer(folder):
    import pickle

    tok = _tok(folder)
    tok.prompt(MESSAGES, 1)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone._tok is None and clone.prompt(MESSAGES, 1) == tok.prompt(MESSAGES, 1)
