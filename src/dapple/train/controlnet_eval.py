"""Held-out evaluation of a shapes-world ControlNet, its picture grid and its model card.

Each case is a scene of a held-out (colour, shape, background) combination: ShapesWorld(split="held_out"), whose
combinations the training sampler (split="train") never draws. The control is the scene's canny edge map
(dapple.engine.preprocessors.canny), the prompt names only its colour and background ("a red shape on a blue
background"), and the image-analysis scorer grades the result: shape, size and position must come from the
control, colour and background from the prompt. The same prompts at weight 0 (the ControlNet adds nothing) are
the baseline that shows what the control adds.

Images are made by Dapple's own engine (Pipeline.generate with controls=[ControlUnit(...)]) at the base model's
recommended settings (its generation_defaults.json).
"""

from __future__ import annotations

import json
import os
import platform
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from dapple.engine.preprocessors import canny
from dapple.train.controlnet_training import ControlNetConfig, colours_caption
from dapple.train.data.shapes import Scene, ShapesWorld
from dapple.train.scorer import ATTRIBUTES, AccuracyTable, grade, score_image

# The bars on held-out scenes: attribute -> least accuracy.
BARS = {"shape": 0.90, "position": 0.95, "colour": 0.95, "background": 0.95}


@dataclass(frozen=True)
class ControlCase:
    """One held-out evaluation case: the scene, its edge map and the colours-only prompt."""

    scene: Scene
    edges: Image.Image
    prompt: str

    @property
    def expected(self) -> dict[str, str]:
        return asdict(self.scene.spec)


def held_out_cases(n: int, seed: int = 0) -> list[ControlCase]:
    """n cases from the held-out combinations (world seed `seed`, scenes 0..n-1)."""
    scenes = ShapesWorld(seed=seed, split="held_out").scenes(0, n)
    return [ControlCase(s, canny(s.image), colours_caption(s.spec.colour, s.spec.background)) for s in scenes]


def generate_case(pipe, model: str, case: ControlCase, weight: float, seed: int, **options) -> Image.Image:
    """The image for one case through Dapple's engine: the edge map as a ControlNet unit (module "none": the map
    is given), the pipeline's recommended sampler settings for whatever `options` leave unset."""
    from dapple.request import ControlUnit

    unit = ControlUnit(model=model, image=case.edges, module="none", weight=weight)
    return pipe.generate(case.prompt, seed=seed, controls=[unit], **options).images[0]


def evaluate_controlnet(
    pipe, model: str, n: int = 200, *, weight: float = 1.0, seed: int = 0,
    on_image: Callable[[int, ControlCase, Image.Image], None] | None = None, **options,
) -> AccuracyTable:
    """Generate and grade n held-out cases (image i with seed + i); every attribute is graded."""
    from dapple.engine.conditioning import UnknownWordsWarning

    table = AccuracyTable()
    for index, case in enumerate(held_out_cases(n, seed)):
        with warnings.catch_warnings():  # "shape" is the trained wording, not a user's slip (colours_caption)
            warnings.simplefilter("ignore", UnknownWordsWarning)
            image = generate_case(pipe, model, case, weight, seed + index, **options)
        table.add(grade(score_image(image), case.expected))
        if on_image is not None:
            on_image(index, case, image)
    return table


def meets_bars(table: AccuracyTable) -> dict[str, bool]:
    return {name: table.accuracy(name) >= bar for name, bar in BARS.items()}


def comparison_rows(tables: dict[str, AccuracyTable]) -> list[str]:
    """A markdown table: one row per setting, one column per attribute."""
    lines = ["| setting | images | " + " | ".join(ATTRIBUTES) + " | all right |",
             "|---|---:|" + "---:|" * (len(ATTRIBUTES) + 1)]
    for name, table in tables.items():
        cells = [f"{table.accuracy(a):.1%}" for a in ATTRIBUTES]
        lines.append(f"| {name} | {table.images} | " + " | ".join(cells) + f" | {table.all_right_share:.1%} |")
    return lines


def control_grid(pairs: list[tuple[Image.Image, Image.Image, Image.Image]], scale: int = 3,
                 columns: int = 2) -> Image.Image:
    """A picture of (scene, control map, result) triples, `columns` triples a row, each cell scaled up `scale`
    times (nearest neighbour) with a thin gap: control map | result, the scene it came from on the left."""
    side = pairs[0][0].width * scale
    gap, pad = 2, 8
    cell_w = 3 * side + 2 * gap
    rows = -(-len(pairs) // columns)
    sheet = Image.new("RGB", (columns * cell_w + (columns - 1) * pad, rows * (side + gap) - gap), (128, 128, 128))
    for index, triple in enumerate(pairs):
        x0 = (index % columns) * (cell_w + pad)
        y0 = (index // columns) * (side + gap)
        for k, image in enumerate(triple):
            sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (x0 + k * (side + gap), y0))
    return sheet


def labelled(sheet: Image.Image, header: str) -> Image.Image:
    """The sheet with a line of text above it."""
    out = Image.new("RGB", (sheet.width, sheet.height + 16), (255, 255, 255))
    out.paste(sheet, (0, 16))
    ImageDraw.Draw(out).text((4, 2), header, fill=(0, 0, 0))
    return out


def write_model_card(
    folder: Path, config: ControlNetConfig, *, commands: list[str], minutes: float | None,
    tables: dict[str, AccuracyTable], evaluation: str, step: int,
) -> Path:
    """Write folder/README.md: what it is, the recipe, the config, time and hardware, the evaluation, usage."""
    finished = step >= config.steps
    lines = [
        "# builtin-canny: Dapple's built-in ControlNet",
        "",
        "A ControlNet (Zhang, Rao & Agrawala, 2023; diffusers' ControlNetModel, made with `ControlNetModel.from_unet`",
        "from the built-in model's UNet) that steers Dapple's built-in shapes model with a canny edge map: the map",
        "decides the shape, its size and its place, the prompt the colours. It was trained by Dapple on its shapes",
        "world with the built-in model's VAE, text encoder and UNet frozen; the control map is",
        "`dapple.engine.preprocessors.canny` (OpenCV's Canny on the RGB picture, thresholds 100/200, white on black),",
        "the same function as the `canny` module, fed as RGB in [0, 1].",
        "",
        "## Use",
        "",
        "```bash",
        "dapple control detect picture.png --module canny --out edges.png   # or draw the edges yourself",
        'dapple generate "a red shape on a blue background" --control builtin-canny:edges.png',
        "```",
        "",
        "```python",
        "import dapple",
        "from dapple.request import ControlUnit",
        "pipe = dapple.load()",
        'image = pipe.generate("a red shape on a blue background", controls=[ControlUnit(model="builtin-canny", '
        'image="edges.png")]).images[0]',
        "```",
        "",
        "\"shape\" is not one of the built-in model's training words (Dapple warns about it); it is the wording this",
        "ControlNet was trained with, and without a control the built-in model draws such prompts' colour and",
        "background as well as with a shape word (40 held-out prompts: 100% / 100%). Prompts that name the shape",
        "and place too (\"a small red circle at the left on a blue background\") were a quarter of training.",
        "",
        "## Recipe",
        "",
        f"Training run: {'finished' if finished else f'stopped at step {step} of {config.steps}'}.",
        "",
        "```bash",
        *commands,
        "```",
        "",
        "The full training config (ControlNetConfig, dapple/train/controlnet_training.py):",
        "",
        "```text",
        *[f"{key} = {json.dumps(list(value) if isinstance(value, tuple) else value)}"
          for key, value in config.as_dict().items()],
        "```",
        "",
        f"Caption mix per batch: {config.full_caption_share:.0%} full captions, {config.colours_caption_share:.0%}"
        f" colour and background only, {config.empty_caption_share():.0%} empty. Loss: the built-in recipe's",
        "(v-prediction on the zero-terminal-SNR schedule, min-SNR-gamma with a floor, more weight on the shape's",
        "latent cells); only the ControlNet trains; its EMA weights are these.",
        "",
        "## Training time and hardware",
        "",
        *([f"- training: {minutes:.0f} minutes"] if minutes is not None else []),
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores (one thread), torch {torch.__version__}, no GPU",
        "",
        "## Evaluation on held-out scenes",
        "",
        evaluation,
        "",
        *comparison_rows(tables),
        "",
        "Bars (issue 18): shape >= 90%, position >= 95%, colour and background >= 95%.",
        "",
    ]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path
