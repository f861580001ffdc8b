"""The bundled tokenizer must give exactly CLIP's token ids."""


import pytest

from dapple.models.tokenizer import bundled_clip_tokenizer

# Ids from OpenAI CLIP's own SimpleTokenizer (and the Hugging Face docs' "a photo of a cat" example).
KNOWN_CLIP_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "Hello world": [49406, 3306, 1002, 49407],
    "a small red circle at the left on a blue background": [
        49406, 320, 2442, 736, 7117, 536, 518, 1823, 525, 320, 1746, 5994, 49407,
    ],
    "don't stop (masterpiece:1.2) café": [49406, 847, 713, 1691, 263, 12066, 281, 272, 269, 273, 264, 15304, 49407],
}


@pytest.mark.parametrize("text", sorted(KNOWN_CLIP_IDS))
def test_token_ids_are_clips(text: str) -> None:
    assert bundled_clip_tokenizer()(text).input_ids == KNOWN_CLIP_IDS[text]


def test_vocabulary_and_specials_match_clip() -> None:
    tokenizer = bundled_clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)


def test_tokenizer_pads_to_77_with_end_tokens() -> None:
    ids = bundled_clip_tokenizer()("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[:7] == KNOWN_CLIP_IDS["a photo of a cat"]
    assert set(ids[7:]) == {49407}

