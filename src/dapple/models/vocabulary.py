"""A model's training vocabulary: the words its captions used, stored as vocabulary.json in the model folder.

Models trained on a closed world (Dapple's built-in shapes model) only understand those words; a prompt with
others still generates, but the user is told which words the model never saw. Models without the file (every
ordinary Stable Diffusion checkpoint) are not checked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

VOCABULARY_FILE = "vocabulary.json"
_WORD = re.compile(r"[a-z]+")


def write_vocabulary(folder: Path, words: Iterable[str]) -> Path:
    path = Path(folder) / VOCABULARY_FILE
    path.write_text(json.dumps({"words": sorted(set(words))}, indent=1) + "\n")
    return path


def read_vocabulary(folder: Path) -> frozenset[str] | None:
    """The folder's vocabulary, or None when it has no vocabulary.json."""
    path = Path(folder) / VOCABULARY_FILE
    if not path.is_file():
        return None
    return frozenset(json.loads(path.read_text())["words"])


def unknown_words(text: str, vocabulary: frozenset[str]) -> list[str]:
    """Words of text (lower-cased, in order, without repeats) that are not in the vocabulary."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(text.lower()):
        if word not in vocabulary:
            seen.setdefault(word)
    return list(seen)
