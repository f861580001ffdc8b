"""Captions for shapes-world scenes, and reading the attributes back out of a caption.

The canonical form is "a small red circle at the left on a blue background". Size and position phrases are
optional (so "a red circle on a blue background" is a valid prompt), and a few paraphrases vary the wording.
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dapple.train.data.shapes import SceneSpec

# Share of captions that name the size / the position (the rest leave them out).
SIZE_MENTION = 0.7
POSITION_MENTION = 0.7


def position_phrase(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def caption_for(spec: SceneSpec, rng: random.Random) -> str:
    """A caption for spec; which optional phrases appear, and the wording, come from rng."""
    size = f"{spec.size} " if rng.random() < SIZE_MENTION else ""
    where = f" {position_phrase(spec.position)}" if rng.random() < POSITION_MENTION else ""
    thing = f"{size}{spec.colour} {spec.shape}"
    form = rng.random()
    if form < 0.8:
        return f"a {thing}{where} on a {spec.background} background"
    if form < 0.9:
        return f"a {thing}{where}, {spec.background} background"
    return f"a {spec.background} background with a {thing}{where}"


def canonical_caption(spec: SceneSpec) -> str:
    """The canonical caption naming every attribute."""
    return f"a {spec.size} {spec.colour} {spec.shape} {position_phrase(spec.position)} on a {spec.background} background"


def parse_caption(caption: str) -> dict[str, str]:
    """The attributes a caption names (any of shape, colour, background, size, position)."""
    from dapple.train.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES

    text = caption.lower()
    found: dict[str, str] = {}
    colours = "|".join(COLOURS)
    background = re.search(rf"\b({colours}) background\b", text)
    if background:
        found["background"] = background.group(1)
        text = text[: background.start()] + text[background.end():]
    thing = re.search(rf"\b(?:({'|'.join(SIZES)}) )?({colours}) ({'|'.join(SHAPES)})\b", text)
    if thing:
        if thing.group(1):
            found["size"] = thing.group(1)
        found["colour"], found["shape"] = thing.group(2), thing.group(3)
    for position in sorted(POSITIONS, key=len, reverse=True):  # "top left" before "left"
        if re.search(rf"\b(?:at|in) the {position}\b", text):
            found["position"] = position
            break
    return found


def caption_vocabulary() -> list[str]:
    """Every word a shapes-world caption can contain (what the built-in model was trained to read)."""
    from dapple.train.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES

    words = {"a", "at", "the", "in", "on", "background", "with"}
    for phrase in [*COLOURS, *SHAPES, *SIZES, *POSITIONS]:
        words.update(phrase.split())
    return sorted(words)
