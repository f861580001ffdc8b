"""A1111 prompt syntax: attention weights and BREAK, and prompts longer than CLIP's 75 tokens.

- `(words)` multiplies their attention by 1.1, `[words]` by 1/1.1, `(words:1.3)` by 1.3; brackets nest and
  multiply; `\\(` `\\)` `\\[` `\\]` are literal brackets; an unclosed bracket applies to the end of the prompt.
- `BREAK` ends the current 75-token chunk. A prompt longer than 75 tokens is split into chunks of 75 (cut after
  the last comma when one is within the chunk's last 20 tokens, as A1111 does), each encoded on its own with its
  own start/end tokens, and the hidden states are concatenated along the sequence.
- Weights scale each token's hidden state; the chunk's mean is then restored, so emphasis changes direction, not
  overall magnitude (A1111's modules/sd_hijack_clip.py behaviour).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20  # a chunk cut looks this many tokens back for a comma to end on

# Escaped brackets and backslashes, opening brackets, ":weight)", closing brackets, plain text, a lone colon.
_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK_WORD = re.compile(r"\bBREAK\b")
BREAK = None  # marks a BREAK in the parsed fragments


def parse_attention(text: str) -> list[tuple[str | None, float]]:
    """Split a prompt into (text, weight) fragments; a fragment (None, 0.0) stands for BREAK.

    >>> parse_attention("a (red:1.5) circle")
    [('a ', 1.0), ('red', 1.5), (' circle', 1.0)]
    """
    fragments: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            if fragment[0] is not BREAK:
                fragment[1] *= factor

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            fragments.append([piece[1:], 1.0])
        elif piece == "(":
            open_round.append(len(fragments))
        elif piece == "[":
            open_square.append(len(fragments))
        elif weight is not None and open_round:
            multiply_from(open_round.pop(), float(weight))
        elif piece == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_MULTIPLIER)
        elif piece == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            for index, part in enumerate(_BREAK.split(piece)):
                if index:
                    fragments.append([BREAK, 0.0])
                fragments.append([part, 1.0])
    for start in open_round:  # unclosed brackets reach to the end
        multiply_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        multiply_from(start, SQUARE_MULTIPLIER)

    merged: list[tuple[str | None, float]] = []
    for piece, weight in fragments:
        if piece == "":
            continue
        if merged and piece is not BREAK and merged[-1][0] is not BREAK and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged or [("", 1.0)]


@dataclass
class Chunk:
    """Up to 75 prompt tokens and their weights (start, end and padding tokens are added when encoding)."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def chunk_tokens(tokenizer, text: str) -> list[Chunk]:
    """The prompt's tokens with their weights, in chunks of at most 75 (A1111's chunking with comma backtrack)."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks = [Chunk()]
    last_comma = -1
    for piece, weight in parse_attention(text):
        if piece is BREAK:
            chunks.append(Chunk())
            last_comma = -1
            continue
        for token in tokenizer(piece, add_special_tokens=False).input_ids:
            current = chunks[-1]
            if len(current.ids) == CHUNK_TOKENS:
                carried = Chunk()
                if last_comma >= 0 and len(current.ids) - last_comma <= COMMA_BACKTRACK:
                    carried = Chunk(current.ids[last_comma + 1 :], current.weights[last_comma + 1 :])
                    del current.ids[last_comma + 1 :], current.weights[last_comma + 1 :]
                chunks.append(carried)
                current, last_comma = carried, -1
            if token == comma:
                last_comma = len(current.ids)
            current.ids.append(token)
            current.weights.append(weight)
    return chunks


# -- extra networks: <lora:name:weight> ------------------------------------------------------------------------
_EXTRA_NETWORK = re.compile(r"<(\w+):([^:>]+)((?::[^:>]*)*)>")
EXTRA_NETWORK_KINDS = ("lora",)
_NAME = re.compile(r"^[\w .+\-()\[\]]+$")  # a file name without folders: no /, \ or ..


@dataclass(frozen=True)
class ExtraNetwork:
    """One `<kind:name:weight>` tag (A1111's extra-networks syntax); `name` is a file name without extension."""

    kind: str
    name: str
    weight: float = 1.0


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """The prompt without its `<lora:name:weight>` tags (which A1111 removes before encoding), and the tags.
    The weight defaults to 1; A1111's second (UNet-only) multiplier is not supported and is an error."""
    from dapple.errors import InvalidRequestError

    networks = []
    for match in _EXTRA_NETWORK.finditer(prompt):
        kind, name, rest = match.group(1).lower(), match.group(2).strip(), match.group(3)
        if kind == "lyco":  # LyCORIS's old tag for the same files
            kind = "lora"
        if kind not in EXTRA_NETWORK_KINDS:
            raise InvalidRequestError(f"prompt: <{match.group(1)}:...> is not supported; supported: "
                                      f"{', '.join('<' + k + ':name:weight>' for k in EXTRA_NETWORK_KINDS)}")
        if not _NAME.match(name) or ".." in name:
            raise InvalidRequestError(f"prompt: {name!r} in {match.group(0)} is not a LoRA name (a file name "
                                      "from the LoRA folders, without folders or '..')")
        parts = [part for part in rest.split(":")[1:]]
        if len(parts) > 1:
            raise InvalidRequestError(f"prompt: {match.group(0)} has {len(parts)} multipliers; Dapple takes one "
                                      "(<lora:name:weight>)")
        try:
            weight = float(parts[0]) if parts and parts[0].strip() else 1.0
        except ValueError:
            raise InvalidRequestError(f"prompt: the weight in {match.group(0)} is not a number") from None
        networks.append(ExtraNetwork(kind, name, weight))
    return _EXTRA_NETWORK.sub("", prompt), networks
