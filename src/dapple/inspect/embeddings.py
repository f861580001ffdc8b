"""The text side: which token ids a prompt becomes, and what the text encoder makes of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dapple.inspect.figures import new_figure, save_figure
from dapple.inspect.result import Inspection


def token_table(tokenizer, text: str) -> tuple[list[tuple[int, int, str]], int, int]:
    """(position, id, token) for every token of the text with start and end markers, the slots used, the limit."""
    ids = tokenizer(text, truncation=False).input_ids
    rows = [(position, token_id, tokenizer.convert_ids_to_tokens(token_id)) for position, token_id in enumerate(ids)]
    limit = tokenizer.model_max_length
    return rows, min(len(ids), limit), limit


@torch.inference_mode()
def _encode(pipe, text: str) -> tuple[torch.Tensor, list[str]]:
    """The encoder's last hidden states (77, hidden) and the token strings of the used slots."""
    ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    states = pipe.text_encoder(ids.to(pipe.device))[0][0].float().cpu()
    used = min(len(pipe.tokenizer(text, truncation=False).input_ids), ids.shape[1])
    return states, pipe.tokenizer.convert_ids_to_tokens(ids[0, :used].tolist())


def embeddings(pipe, text: str, out: Path, vs: str | None = None) -> Inspection:
    """Shape and per-token norms of a prompt's embedding; with `vs`, the token-by-token cosine similarity to
    another prompt's embedding as a heatmap, and the cosine of the two whole embeddings."""
    states, tokens = _encode(pipe, text)
    result = Inspection(numbers={"sequence": states.shape[0], "hidden": states.shape[1]})
    result.lines.append(f"embedding shape: 1 x {states.shape[0]} x {states.shape[1]} (batch x tokens x hidden)")
    norms = states[: len(tokens)].norm(dim=-1).numpy()
    figure, axes = new_figure(12 if vs else 7, 4.5, columns=2 if vs else 1)
    bars = axes[0] if vs else axes
    bars.bar(range(len(tokens)), norms, color="#4c72b0")
    bars.set_xticks(range(len(tokens)), tokens, rotation=60, ha="right", fontsize=8)
    bars.set(title=f"per-token embedding norms: {text!r}", xlabel="token", ylabel="L2 norm")
    if vs:
        other, other_tokens = _encode(pipe, vs)
        a = torch.nn.functional.normalize(states[: len(tokens)], dim=-1)
        b = torch.nn.functional.normalize(other[: len(other_tokens)], dim=-1)
        similarity = (a @ b.T).numpy()
        whole = float(torch.nn.functional.cosine_similarity(states.flatten(), other.flatten(), dim=0))
        result.numbers["cosine"] = whole
        result.lines.append(f"cosine similarity of the whole embeddings: {whole:.4f}")
        image = axes[1].imshow(similarity, cmap="viridis", vmin=-1, vmax=1)
        axes[1].set_xticks(range(len(other_tokens)), other_tokens, rotation=60, ha="right", fontsize=8)
        axes[1].set_yticks(range(len(tokens)), tokens, fontsize=8)
        axes[1].set(title=f"token cosine similarity (whole: {whole:.3f})", xlabel=repr(vs), ylabel=repr(text))
        figure.colorbar(image, ax=axes[1])
    for position, (token, norm) in enumerate(zip(tokens, norms)):
        result.lines.append(f"{position:>3}  {token:<20} norm {norm:.3f}")
    result.files.append(save_figure(figure, out / "embeddings.png"))
    return result
