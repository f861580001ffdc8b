"""The command line's control units: `--control MODEL:IMAGE[:weight[:start:end]]` and its companion options,
and the `dapple control` commands (detect, modules, models)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dapple.errors import InvalidRequestError

CONTROL_FORM = "MODEL:IMAGE[:weight[:start:end]]"


def _number(text: str, what: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidRequestError(f"--control {spec!r}: {what} {text!r} is not a number; form: {CONTROL_FORM}") from None


def _pick(values: list[str], index: int, count: int, flag: str) -> Optional[str]:
    """The i-th value of a repeatable companion option: one value applies to every unit."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    if len(values) != count:
        raise InvalidRequestError(f"{flag} was given {len(values)} times for {count} --control units; give it once "
                                  "(for every unit) or once per unit, in the same order")
    return values[index]


def parse_controls(specs: list[str], modules: list[str], modes: list[str], resizes: list[str]) -> list[dict]:
    """--control specs (with the i-th --control-module/--control-mode/--control-resize, or one for all) ->
    ControlUnit fields. A ':' splits the parts, so model names and image paths cannot contain one."""
    units = []
    for index, spec in enumerate(specs):
        parts = spec.split(":")
        if len(parts) not in (2, 3, 5) or not parts[0] or not parts[1]:
            raise InvalidRequestError(f"--control {spec!r} has {len(parts)} part(s); form: {CONTROL_FORM}, e.g. "
                                      "builtin-canny:edges.png:0.8:0:1")
        image = Path(parts[1])
        if not image.is_file():
            raise InvalidRequestError(f"--control {spec!r}: the image {str(image)!r} does not exist")
        unit: dict = {"model": parts[0], "image": image}
        if len(parts) >= 3:
            unit["weight"] = _number(parts[2], "the weight", spec)
        if len(parts) == 5:
            unit["guidance_start"] = _number(parts[3], "the start", spec)
            unit["guidance_end"] = _number(parts[4], "the end", spec)
        for flag, field, values in (("--control-module", "module", modules), ("--control-mode", "control_mode", modes),
                                    ("--control-resize", "resize_mode", resizes)):
            value = _pick(values, index, len(specs), flag)
            if value is not None:
                unit[field] = value
        units.append(unit)
    for flag, values in (("--control-module", modules), ("--control-mode", modes), ("--control-resize", resizes)):
        if values and not specs:
            raise InvalidRequestError(f"{flag} needs a --control unit to apply to")
    return units


control_app = typer.Typer(help="Control maps and models: detect a map, list preprocessors and control models.",
                          no_args_is_help=True)


@control_app.command("detect")
def detect(
    image: Path = typer.Argument(..., help="a picture"),
    module: str = typer.Option("canny", help="the preprocessor (see `dapple control modules`)"),
    out: Path = typer.Option(Path("map.png"), help="where to write the map (.png)"),
    width: Optional[int] = typer.Option(None, min=8, max=4096, help="map width [default: the image's]"),
    height: Optional[int] = typer.Option(None, min=8, max=4096, help="map height [default: the image's]"),
    resolution: Optional[int] = typer.Option(None, min=64, max=2048, help="processor resolution (short side) "
                                             "[default: the map's short side]"),
    threshold_a: Optional[float] = typer.Option(None, help="the module's first parameter (canny: low threshold)"),
    threshold_b: Optional[float] = typer.Option(None, help="the module's second parameter (canny: high threshold)"),
    mask: Optional[Path] = typer.Option(None, help="inpaint_only: the mask (white = repaint)"),
) -> None:
    """Write the control map a preprocessor makes of IMAGE, so you can look at it before generating."""
    from dapple.engine.control_maps import control_map
    from dapple.engine.images import open_image
    from dapple.interfaces.cli import check_image_file, say, user_errors

    with user_errors():
        check_image_file(image, "IMAGE")
        if out.suffix.lower() != ".png":
            raise InvalidRequestError(f"--out {str(out)!r} must end in .png")
        picture = open_image(image, what="IMAGE")
        made = control_map(picture, module, width or picture.width, height or picture.height,
                           processor_res=resolution, threshold_a=threshold_a, threshold_b=threshold_b,
                           mask=open_image(mask, what="--mask") if mask else None)
        if not hasattr(made, "save"):  # inpaint_only's tensor: masked pixels (-1) shown black
            from PIL import Image

            made = Image.fromarray((made[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
        out.parent.mkdir(parents=True, exist_ok=True)
        made.save(out)
    say(str(out))


@control_app.command("modules")
def modules() -> None:
    """List the preprocessors and their parameters."""
    from dapple.engine.control_maps import MODULES, module_details
    from dapple.interfaces.cli import say

    details = module_details()
    for name, spec in MODULES.items():
        sliders = ", ".join(f"{s['name']} {s['value']:g} ({s['min']:g}..{s['max']:g})" for s in details[name]["sliders"])
        say(f"{name:20} {spec.description}" + (f" [{sliders}]" if sliders else ""))


@control_app.command("models")
def models(control_dir: list[Path] = typer.Option([], "--control-dir", help="a folder of control models")) -> None:
    """List the control models Dapple finds: the built-in ones and those in --control-dir folders."""
    from dapple.interfaces.cli import say, user_errors
    from dapple.models.control_models import list_control_models

    with user_errors():
        for entry in list_control_models(control_dir):
            say(f"{entry.name} [{entry.short_hash}]  {entry.kind}  {entry.path}")
