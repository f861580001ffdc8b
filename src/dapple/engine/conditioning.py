"""Prompt conditioning: text -> CLIP token ids -> text-encoder hidden states, for classifier-free guidance.

Prompts use A1111's syntax (prompt_syntax.py): (weights), [weights], BREAK, and any length in 75-token chunks.

Classifier-free guidance (Ho & Salimans, 2022) needs the embeddings of the prompt and of a negative (or empty)
prompt; the UNet sees both in one batch and the loop mixes the two predictions. With guidance_scale <= 1 the
mix is just the conditional prediction, so the unconditional half is not computed at all.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from dapple.engine.prompt_syntax import BREAK_WORD, CHUNK_TOKENS, Chunk, chunk_tokens
from dapple.errors import DappleWarning
from dapple.models.vocabulary import unknown_words


class UnknownWordsWarning(DappleWarning):
    """A prompt used words the model never saw in training (only models that ship a vocabulary say so)."""


def warn_unknown_words(prompt: str, negative_prompt: str, vocabulary: frozenset[str] | None) -> None:
    if vocabulary is None:
        return
    text = BREAK_WORD.sub(" ", f"{prompt} {negative_prompt}")  # prompt syntax, not a word of the prompt
    unknown = unknown_words(text, vocabulary)
    if unknown:
        warnings.warn(
            f"this model never saw the words {', '.join(repr(w) for w in unknown)} in training and will ignore "
            f"their meaning; it knows: {', '.join(sorted(vocabulary))}",
            UnknownWordsWarning,
            stacklevel=3,
        )


@dataclass
class Conditioning:
    """Text embeddings for a batch: `cond` for the prompt, `uncond` for the negative prompt (None: no CFG)."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None

    @property
    def uses_guidance(self) -> bool:
        return self.uncond is not None

    @property
    def unet_batch(self) -> torch.Tensor:
        """The encoder hidden states for one UNet call: [uncond; cond] under CFG (diffusers' order)."""
        return self.cond if self.uncond is None else torch.cat([self.uncond, self.cond])


def uses_guidance(guidance_scale: float) -> bool:
    return guidance_scale > 1.0


def _chunk_ids(tokenizer: CLIPTokenizer, chunk: Chunk) -> list[int]:
    """[start] + tokens + [end] + padding to 77: the layout diffusers gives a prompt that fits in one chunk."""
    padding = [tokenizer.pad_token_id] * (CHUNK_TOKENS - len(chunk.ids))
    return [tokenizer.bos_token_id, *chunk.ids, tokenizer.eos_token_id, *padding]


def _encode(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, text: str) -> torch.Tensor:
    """Hidden states (1, 77 x chunks, hidden) of a prompt in A1111 syntax (weights, BREAK, any length)."""
    chunks = chunk_tokens(tokenizer, text)
    ids = torch.tensor([_chunk_ids(tokenizer, chunk) for chunk in chunks], device=text_encoder.device)
    # SD 1.x conditions on the last hidden state of CLIP's text transformer, without an attention mask.
    states = text_encoder(ids, attention_mask=None)[0]
    weights = [[1.0, *chunk.weights, *[1.0] * (CHUNK_TOKENS + 1 - len(chunk.weights))] for chunk in chunks]
    if any(weight != 1.0 for row in weights for weight in row):
        scale = torch.tensor(weights, device=states.device, dtype=torch.float32)[..., None]
        original = states.float()
        weighted = original * scale
        # Restore each chunk's mean so that emphasis changes direction, not the overall magnitude (A1111).
        weighted = weighted * (original.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True))
        states = weighted.to(states.dtype)
    return states.reshape(1, -1, states.shape[-1]).to(dtype=text_encoder.dtype)


def _pad_to(embeddings: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """Lengthen a prompt's hidden states with empty-prompt chunks (A1111 pads the shorter of cond/uncond)."""
    missing = (length - embeddings.shape[1]) // empty.shape[1]
    return torch.cat([embeddings, *[empty] * missing], dim=1) if missing > 0 else embeddings


def encode_prompt(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    prompt: str,
    negative_prompt: str = "",
    *,
    guidance_scale: float = 7.0,
    batch_size: int = 1,
) -> Conditioning:
    """Embed a prompt (and its negative when guidance is on), repeated for a batch of images."""
    cond = _encode(tokenizer, text_encoder, prompt)
    uncond = _encode(tokenizer, text_encoder, negative_prompt) if uses_guidance(guidance_scale) else None
    if uncond is not None and uncond.shape[1] != cond.shape[1]:  # one batch needs one sequence length
        empty = _encode(tokenizer, text_encoder, "")
        length = max(cond.shape[1], uncond.shape[1])
        cond, uncond = _pad_to(cond, length, empty), _pad_to(uncond, length, empty)
    repeat = lambda embeddings: embeddings.repeat(batch_size, 1, 1)  # noqa: E731
    return Conditioning(cond=repeat(cond), uncond=None if uncond is None else repeat(uncond))
