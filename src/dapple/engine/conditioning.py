"""Prompt conditioning: text -> CLIP token ids -> text-encoder hidden states, for classifier-free guidance.

Classifier-free guidance (Ho & Salimans, 2022) needs the embeddings of the prompt and of a negative (or empty)
prompt; the UNet sees both in one batch and the loop mixes the two predictions. With guidance_scale <= 1 the
mix is just the conditional prediction, so the unconditional half is not computed at all.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from dapple.errors import DappleWarning
from dapple.models.vocabulary import unknown_words


class PromptTruncatedWarning(DappleWarning):
    """A prompt had more tokens than the text encoder reads; the rest were dropped."""


class UnknownWordsWarning(DappleWarning):
    """A prompt used words the model never saw in training (only models that ship a vocabulary say so)."""


def warn_unknown_words(prompt: str, negative_prompt: str, vocabulary: frozenset[str] | None) -> None:
    if vocabulary is None:
        return
    unknown = unknown_words(f"{prompt} {negative_prompt}", vocabulary)
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


def tokenize(tokenizer: CLIPTokenizer, text: str) -> torch.Tensor:
    """Token ids padded/truncated to the model's length (77 for CLIP), warning when tokens were dropped."""
    limit = tokenizer.model_max_length
    full_length = len(tokenizer(text, truncation=False, add_special_tokens=True).input_ids)
    if full_length > limit:
        warnings.warn(
            f"prompt has {full_length - 2} tokens but the text encoder reads {limit - 2}; "
            f"the last {full_length - limit} tokens were dropped",
            PromptTruncatedWarning,
            stacklevel=3,
        )
    return tokenizer(
        text, padding="max_length", max_length=limit, truncation=True, return_tensors="pt"
    ).input_ids


def _encode(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, text: str) -> torch.Tensor:
    ids = tokenize(tokenizer, text).to(text_encoder.device)
    # SD 1.x conditions on the last hidden state of CLIP's text transformer, without an attention mask.
    return text_encoder(ids, attention_mask=None)[0].to(dtype=text_encoder.dtype)


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
    repeat = lambda embeddings: embeddings.repeat(batch_size, 1, 1)  # noqa: E731
    return Conditioning(cond=repeat(cond), uncond=None if uncond is None else repeat(uncond))
