"""Textual inversion (Gal et al., 2022, "An Image is Worth One Word"): learned token embeddings, triggered by name.

An embedding file holds one or more vectors in the text encoder's input space. Writing the file's name in a
prompt puts those vectors where the name stands, as A1111 does. Files:

- A1111 .safetensors: `emb_params` (n x hidden); A1111 .pt: {"string_to_param": {"*": n x hidden}, ...}
- diffusers learned_embeds(.safetensors/.bin): {"<token>": hidden or n x hidden}
- SDXL: {"clip_l": n x 768, "clip_g": n x 1280}, one set of vectors per text encoder.

Pickle files (.pt, .bin) are read only with allow_pickle, through torch's weights_only loader.
Installing an embedding adds placeholder tokens to a private copy of the tokenizer and rows to the text encoder's
embedding matrix; other prompts encode exactly as before (their token ids are untouched).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from dapple.errors import ModelLoadError, PickleRefusedError

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
EMBEDDING_HASH_LENGTH = 12  # A1111's "TI hashes" use the first 12 hex digits of the file's sha256


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: torch.Tensor  # (n, hidden)
    vectors_2: torch.Tensor | None = None  # SDXL: the second text encoder's (n, hidden_2)


def read_embedding(path: str | Path, allow_pickle: bool = False) -> Embedding:
    """The vectors of an embedding file, named by the file's stem."""
    path = Path(path)
    if path.suffix == ".safetensors":
        data: dict = load_file(str(path))
    elif not allow_pickle:
        raise PickleRefusedError(f"{path}: embeddings in pickle files (.pt/.bin) are read only with allow_pickle "
                                 "(torch's weights_only loader); a .safetensors embedding needs nothing")
    else:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    if "clip_l" in data and "clip_g" in data:
        first, second = (data[key].detach().float() for key in ("clip_l", "clip_g"))
        return Embedding(path.stem, first[None] if first.ndim == 1 else first,
                         second[None] if second.ndim == 1 else second)
    if "string_to_param" in data:
        data = data["string_to_param"]
    tensors = [value for value in data.values() if isinstance(value, torch.Tensor)]
    if "emb_params" in data:
        tensors = [data["emb_params"]]
    if len(tensors) != 1:
        raise ModelLoadError(f"{path}: not an embedding: expected one tensor (emb_params, string_to_param or a "
                             f"single learned token), found keys {sorted(map(str, data))[:5]}")
    vectors = tensors[0].detach().float()
    return Embedding(path.stem, vectors[None] if vectors.ndim == 1 else vectors)


def _placeholders(name: str, count: int) -> list[str]:
    return [f"<ti-{name}-{index}>" for index in range(count)]


def install(components, embedding: Embedding) -> str:
    """Give the components' tokenizer(s) and text encoder(s) this embedding; return the text that stands for it."""
    targets = [("tokenizer", "text_encoder", embedding.vectors)]
    if components.is_xl:
        if embedding.vectors_2 is None:
            raise ModelLoadError(f"embedding {embedding.name!r} is for SD 1.x/2.x; an SDXL model needs clip_l and "
                                 "clip_g vectors")
        targets.append(("tokenizer_2", "text_encoder_2", embedding.vectors_2))
    elif embedding.vectors_2 is not None:
        raise ModelLoadError(f"embedding {embedding.name!r} is an SDXL embedding (clip_l + clip_g); this model "
                             "is SD 1.x/2.x")
    for tokenizer_name, encoder_name, vectors in targets:
        hidden = getattr(components, encoder_name).get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != hidden:
            raise ModelLoadError(f"embedding {embedding.name!r} has {vectors.shape[1]}-wide vectors; this model's "
                                 f"text encoder takes {hidden} (is it for SD 1.x vs 2.x?)")
    tokens = _placeholders(embedding.name, len(embedding.vectors))
    for tokenizer_name, encoder_name, vectors in targets:
        owned = f"_owns_{tokenizer_name}"
        if not getattr(components, owned, False):  # the bundled tokenizers are shared: add to a copy
            setattr(components, tokenizer_name, copy.deepcopy(getattr(components, tokenizer_name)))
            setattr(components, owned, True)
        tokenizer, encoder = getattr(components, tokenizer_name), getattr(components, encoder_name)
        tokenizer.add_tokens(tokens)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        if max(ids) >= encoder.get_input_embeddings().weight.shape[0]:
            encoder.resize_token_embeddings(len(tokenizer))
        with torch.no_grad():
            weight = encoder.get_input_embeddings().weight
            weight[ids] = vectors.to(weight.device, weight.dtype)
    if components.is_xl and components.tokenizer.convert_tokens_to_ids(tokens) != \
            components.tokenizer_2.convert_tokens_to_ids(tokens):
        raise ModelLoadError("SDXL's two tokenizers gave the embedding different ids")  # both share one chunking
    return " ".join(tokens)


def name_pattern(name: str) -> re.Pattern:
    """The name as a whole word of a prompt."""
    return re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
