"""A1111 prompt syntax: attention weights, escapes, BREAK, and prompts beyond 75 tokens in chunks."""

from __future__ import annotations

import pytest
import torch

from dapple.engine.conditioning import encode_prompt
from dapple.engine.prompt_syntax import chunk_tokens, parse_attention
from dapple.models.tokenizer import bundled_clip_tokenizer


@pytest.mark.parametrize("text, expected", [  # the examples A1111 documents for parse_prompt_attention
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1)]),
    ("[faded]", [("faded", 1 / 1.1)]),
    ("a (red:1.5) circle", [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]),
    ("stray ) bracket", [("stray ) bracket", 1.0)]),
    ("a BREAK b", [("a", 1.0), (None, 0.0), ("b", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_attention(text: str, expected: list) -> None:
    parsed = parse_attention(text)
    assert [piece for piece, _ in parsed] == [piece for piece, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])


def test_chunks_hold_75_tokens_and_break_starts_a_new_one() -> None:
    tokenizer = bundled_clip_tokenizer()
    assert [len(c.ids) for c in chunk_tokens(tokenizer, " ".join(["cat"] * 160))] == [75, 75, 10]
    assert [len(c.ids) for c in chunk_tokens(tokenizer, "a red circle BREAK a blue square")] == [3, 3]
    assert [len(c.ids) for c in chunk_tokens(tokenizer, "")] == [0]


def test_a_chunk_is_cut_after_a_nearby_comma() -> None:
    tokenizer = bundled_clip_tokenizer()
    text = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)  # the comma is token 71
    chunks = chunk_tokens(tokenizer, text)
    assert [len(c.ids) for c in chunks] == [71, 10]
    assert tokenizer.convert_ids_to_tokens(chunks[0].ids[-1]) == ",</w>"


def test_weights_follow_the_brackets() -> None:
    chunk = chunk_tokens(bundled_clip_tokenizer(), "a (red:1.5) [circle]")[0]
    assert chunk.weights == pytest.approx([1.0, 1.5, 1 / 1.1])


def encode(pipe, prompt: str, negative: str = "", guidance: float = 7.0):
    with torch.inference_mode():
        return encode_prompt(pipe.tokenizer, pipe.text_encoder, prompt, negative, guidance_scale=guidance)


def test_plain_prompts_encode_exactly_as_diffusers_does(pipe, reference_pipe) -> None:
    ours = encode(pipe, "a red circle", "blurry")
    with torch.inference_mode():
        cond, uncond = reference_pipe.encode_prompt("a red circle", "cpu", 1, True, "blurry")
    assert torch.equal(ours.cond, cond) and torch.equal(ours.uncond, uncond)


def test_long_prompts_are_chunked_and_cond_uncond_padded_to_one_length(pipe) -> None:
    long = encode(pipe, " ".join(["cat"] * 80), "blurry")
    assert long.cond.shape[1] == long.uncond.shape[1] == 154
    empty = encode(pipe, "", guidance=1.0).cond
    assert torch.equal(long.uncond[:, 77:], empty)  # the negative prompt is padded with empty-prompt chunks
    assert torch.equal(long.uncond[:, :77], encode(pipe, "blurry", guidance=1.0).cond)


def test_weights_change_the_embedding_but_keep_its_mean(pipe) -> None:
    plain = encode(pipe, "a red circle", guidance=1.0).cond
    weighted = encode(pipe, "a (red:1.5) circle", guidance=1.0).cond
    assert (plain - weighted).abs().max() > 1e-3
    assert weighted.float().mean().item() == pytest.approx(plain.float().mean().item(), abs=1e-6)
    assert torch.equal(encode(pipe, "a (red:1) circle", guidance=1.0).cond, plain)  # weight 1: no change


def test_weighted_and_long_prompts_generate(pipe) -> None:
    result = pipe.generate("a (red:1.3) circle BREAK on a [blue] background, " + "very " * 80, steps=2, seed=1,
                           negative_prompt="blurry")
    assert result.images[0].size == (64, 64)
