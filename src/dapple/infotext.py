"""A1111 "infotext": the generation parameters stored in a PNG's `parameters` text chunk.

Format (AUTOMATIC1111 modules/infotext_utils.py): the prompt, an optional "Negative prompt: ..." line, and a
last line of `key: value` pairs separated by ", ". Values holding ',', ':' or a newline are JSON-quoted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

PNG_KEY = "parameters"

# One "key: value" pair: a quoted value may contain commas, an unquoted one runs to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(ch in text for ch in ",:\n") else text


def format_infotext(prompt: str, negative_prompt: str, parameters: Mapping[str, Any]) -> str:
    """Write infotext as A1111 does; parameters with value None are left out."""
    pairs = ", ".join(f"{key}: {_quote(value)}" for key, value in parameters.items() if value is not None)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(pairs)
    return "\n".join(lines)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _number(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_infotext(text: str) -> dict[str, Any]:
    """Read infotext (Dapple's or A1111's) into a dict: Prompt, Negative prompt, each parameter, and
    "Size" split into width and height. Numbers become int or float; other values stay strings."""
    lines = text.strip().split("\n")
    params_line = lines[-1] if lines else ""
    pairs = _PARAM.findall(params_line)
    if len(pairs) >= 3:
        lines = lines[:-1]
    else:
        pairs = []
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in lines:
        if line.startswith("Negative prompt:"):
            negative_lines.append(line[len("Negative prompt:") :].strip())
        elif negative_lines:  # A1111 lets the negative prompt run over several lines
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    result: dict[str, Any] = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, raw in pairs:
        value = _unquote(raw)
        size = _SIZE.match(value) if key == "Size" else None
        if size:
            result["width"], result["height"] = int(size.group(1)), int(size.group(2))
        result[key.strip()] = _number(value) if isinstance(value, str) else value
    return result
