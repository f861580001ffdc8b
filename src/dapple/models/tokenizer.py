"""The CLIP tokenizer that ships with Dapple (rebuilt offline by scripts/build_clip_tokenizer.py)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from transformers import CLIPTokenizer

BUNDLED_TOKENIZER_DIR = Path(__file__).parent / "assets" / "clip_tokenizer"


@cache
def _load_bundled() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(BUNDLED_TOKENIZER_DIR), local_files_only=True)


def folder_tokenizer(model_folder: Path) -> CLIPTokenizer:
    """The tokenizer of a diffusers model folder, or the bundled CLIP tokenizer when it has no tokenizer/."""
    if (Path(model_folder) / "tokenizer").is_dir():
        return CLIPTokenizer.from_pretrained(str(Path(model_folder) / "tokenizer"), local_files_only=True)
    return bundled_clip_tokenizer()


def bundled_clip_tokenizer() -> CLIPTokenizer:
    """OpenAI CLIP's BPE tokenizer (49408 tokens, 77 positions, pad = <|endoftext|>) as SD 1.x uses it."""
    return _load_bundled()
