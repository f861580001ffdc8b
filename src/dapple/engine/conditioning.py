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
    """Text embeddings for a batch: `cond` for the prompt, `uncond` for the negative prompt (None: no CFG).

    SDXL also conditions on the second text encoder's pooled embedding and on "time ids" (original size, crop
    corner, target size; Podell et al., 2023, section 2.2): `pooled`/`pooled_uncond` and `time_ids` hold them."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    pooled_uncond: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    @property
    def added_cond_kwargs(self) -> dict[str, torch.Tensor] | None:
        """What an SDXL UNet takes besides the hidden states, batched like unet_batch; None for SD 1.x/2.x."""
        if self.pooled is None:
            return None
        if self.time_ids is None:
            raise ValueError("SDXL conditioning needs time ids: call with_time_ids(height, width) first")
        if self.uncond is None:
            return {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return {"text_embeds": torch.cat([self.pooled_uncond, self.pooled]),
                "time_ids": torch.cat([self.time_ids, self.time_ids])}

    def with_time_ids(self, height: int, width: int) -> Conditioning:
        """SDXL's size conditioning for an uncropped image generated at its own size, as diffusers sets it."""
        if self.pooled is not None:
            ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.cond.dtype, device=self.cond.device)
            self.time_ids = ids.repeat(self.cond.shape[0], 1)
        return self

    @property
    def uses_guidance(self) -> bool:
        return self.uncond is not None

    def prompt_only(self) -> Conditioning:
        """The same conditioning without the negative half: for steps that skip guidance."""
        return Conditioning(cond=self.cond, pooled=self.pooled, time_ids=self.time_ids)

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


def _encode(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, text: str, *, penultimate: bool = False,
            chunks: list[Chunk] | None = None) -> torch.Tensor:
    """Hidden states (1, 77 x chunks, hidden) of a prompt in A1111 syntax (weights, BREAK, any length).
    penultimate: the second-to-last layer's states, without the final layer norm (what SDXL conditions on)."""
    chunks = chunks if chunks is not None else chunk_tokens(tokenizer, text)
    ids = torch.tensor([_chunk_ids(tokenizer, chunk) for chunk in chunks], device=text_encoder.device)
    if penultimate:
        states = text_encoder(ids, attention_mask=None, output_hidden_states=True).hidden_states[-2]
    else:  # SD 1.x conditions on the last hidden state of CLIP's text transformer, without an attention mask.
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


def _encode_xl(tokenizers: tuple, text_encoders: tuple, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: both encoders' penultimate hidden states side by side (768 + 1280 = 2048 wide), and the second
    encoder's projected pooled output of the first chunk (A1111's choice for long prompts; diffusers' for one)."""
    chunks = chunk_tokens(tokenizers[0], text)  # both tokenizers share CLIP's BPE: the same chunks
    states = [_encode(tok, enc, text, penultimate=True, chunks=chunks) for tok, enc in zip(tokenizers, text_encoders)]
    first = torch.tensor([_chunk_ids(tokenizers[1], chunks[0])], device=text_encoders[1].device)
    pooled = text_encoders[1](first, attention_mask=None)[0]  # CLIPTextModelWithProjection: text_embeds first
    return torch.cat(states, dim=-1), pooled


def encode_prompt_xl(
    tokenizers: tuple, text_encoders: tuple, prompt: str, negative_prompt: str = "", *,
    guidance_scale: float = 5.0, batch_size: int = 1,
) -> Conditioning:
    """SDXL's conditioning for a prompt (and its negative under guidance); time ids come later (with_time_ids)."""
    cond, pooled = _encode_xl(tokenizers, text_encoders, prompt)
    uncond = pooled_uncond = None
    if uses_guidance(guidance_scale):
        uncond, pooled_uncond = _encode_xl(tokenizers, text_encoders, negative_prompt)
        if uncond.shape[1] != cond.shape[1]:
            empty, _ = _encode_xl(tokenizers, text_encoders, "")
            length = max(cond.shape[1], uncond.shape[1])
            cond, uncond = _pad_to(cond, length, empty), _pad_to(uncond, length, empty)
    def repeat(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.repeat(batch_size, *[1] * (tensor.dim() - 1))

    return Conditioning(cond=repeat(cond), uncond=repeat(uncond), pooled=repeat(pooled),
                        pooled_uncond=repeat(pooled_uncond))
