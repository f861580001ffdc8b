"""X/Y grids like A1111's XYZ plot script: the same prompt and seed across the values of one or two parameters
(guidance scale, steps, sampler, seed) in one labelled picture."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dapple.errors import InvalidRequestError
from dapple.inspect.figures import labelled_grid, save_image
from dapple.inspect.result import Inspection

AXES = {"guidance_scale": "CFG", "steps": "steps", "sampler": "sampler", "seed": "seed"}


def parameter_grid(pipe, prompt: str, out: Path, x: tuple[str, Sequence[Any]],
                   y: tuple[str, Sequence[Any]] | None = None, **options: Any) -> Inspection:
    """One image per (x, y) value pair; x runs along the columns, y down the rows."""
    for name, values in (x, y) if y else (x,):
        if name not in AXES:
            raise InvalidRequestError(f"grid axis {name!r} is unknown; allowed: {', '.join(AXES)}")
        if not values:
            raise InvalidRequestError(f"grid axis {name!r} has no values")
    if "seed" not in (x[0], y[0] if y else None):
        options.setdefault("seed", 0)
    y_name, y_values = y if y else ("", [None])
    cells = []
    for y_value in y_values:
        row = []
        for x_value in x[1]:
            settings = {**options, x[0]: x_value, **({y_name: y_value} if y else {})}
            row.append(pipe.generate(prompt, batch_size=1, **settings).images[0])
        cells.append(row)
    x_label, y_label = AXES[x[0]], AXES.get(y_name, "")
    sheet = labelled_grid(cells, [f"{x_label} {v}" for v in x[1]],
                          [f"{y_label} {v}" for v in y_values] if y else (),
                          title=f"{prompt!r}" + "".join(f", {k} {v}" for k, v in options.items()))
    name = "grid-" + x[0] + (f"-{y_name}" if y else "") + ".png"
    return Inspection(files=[save_image(sheet, out / name)], numbers={"images": len(cells) * len(x[1])},
                      lines=[f"{len(cells)} x {len(x[1])} images"])
