"""The CLIP tokenizer that ships with Dapple (rebuilt offline by scripts/build_clip_tokenizer.py)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from transformers import CLIPTokenizer

BUNDLED_TOKENIZER_DIR = Path(__file__).parent / "assets" / "clip_tokenizer"


@cache
def _load_bundled() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(BUNDLED_TOKENIZER_DIR), local_files_only=True)


def folder_tokenizer(model_folder: Path, subfolder: str = "tokenizer") -> CLIPTokenizer:
    """The tokenizer of a diffusers model folder, or the bundled CLIP tokenizer when it has none (SDXL's second
    tokenizer, tokenizer_2, is the same BPE padding with "!")."""
    if (Path(model_folder) / subfolder).is_dir():
        return CLIPTokenizer.from_pretrained(str(Path(model_folder) / subfolder), local_files_only=True)
    if subfolder == "tokenizer_2":
        return CLIPTokenizer.from_pretrained(str(BUNDLED_TOKENIZER_DIR), local_files_only=True, pad_token="!")
    return bundled_clip_tokenizer()


def bundled_clip_tokenizer() -> CLIPTokenizer:
    """OpenAI CLIP's BPE tokenizer (49408 tokens, 77 positions, pad = <|endoftext|>) as SD 1.x uses it."""
    return _load_bundled()
