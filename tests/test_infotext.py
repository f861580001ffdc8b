"""A1111 infotext: written as A1111 writes it, read back (ours and A1111's), stored in PNGs."""

from pathlib import Path

from PIL import Image

from dapple.infotext import format_infotext, parse_infotext
from dapple.service.outputs import read_infotext, save_result

A1111_INFOTEXT = (
    "masterpiece, best quality, (red hair:1.2), portrait\n"
    "Negative prompt: lowres, bad anatomy,\nworst quality\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234567890, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.5, Hires upscale: 2, '
    'Hires upscaler: Latent, Lora hashes: "detail: 2ab1c3d4e5f6, style: 0a1b2c3d4e5f", Version: v1.10.1'
)


def test_parse_a_real_a1111_infotext() -> None:
    params = parse_infotext(A1111_INFOTEXT)
    assert params["Prompt"] == "masterpiece, best quality, (red hair:1.2), portrait"
    assert params["Negative prompt"] == "lowres, bad anatomy,\nworst quality"
    assert params["Steps"] == 28 and params["CFG scale"] == 7.5 and params["Seed"] == 1234567890
    assert (params["width"], params["height"]) == (512, 768)
    assert params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras"
    assert params["Model hash"] == "6ce0161689"
    assert params["Lora hashes"] == "detail: 2ab1c3d4e5f6, style: 0a1b2c3d4e5f"
    assert params["Version"] == "v1.10.1"


def test_format_matches_the_spec_example() -> None:
    text = format_infotext(
        "a red circle on a blue background",
        "blurry",
        {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7", "Seed": 42,
         "Size": "64x64", "Model hash": "0123456789", "Model": "dapple-shapes", "Version": "dapple 0.1.0",
         "Hires upscale": None},
    )
    assert text == (
        "a red circle on a blue background\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 64x64, "
        "Model hash: 0123456789, Model: dapple-shapes, Version: dapple 0.1.0"
    )


def test_round_trip_quotes_values_with_commas_colons_and_newlines() -> None:
    parameters = {"Steps": 5, "Sampler": "Euler a", "Seed": 7, "Model": 'odd, "name": here', "Note": "two\nlines"}
    text = format_infotext("a prompt\nover two lines", "", parameters)
    assert "Negative prompt" not in text
    params = parse_infotext(text)
    assert params["Prompt"] == "a prompt\nover two lines"
    assert params["Negative prompt"] == ""
    assert params["Model"] == 'odd, "name": here'
    assert params["Note"] == "two\nlines"


def test_a_last_line_with_fewer_than_three_pairs_is_prompt() -> None:
    params = parse_infotext("a cat\nstyle: oil, mood: calm")
    assert params["Prompt"] == "a cat\nstyle: oil, mood: calm"
    assert "style" not in params


def test_generated_pngs_carry_their_infotext(pipe, tmp_path: Path) -> None:
    result = pipe.generate("a red circle, big", negative_prompt="blur", steps=2, seed=42, batch_size=2,
                           sampler="Euler a", guidance_scale=6.5)
    paths = save_result(result, tmp_path)
    assert [p.name for p in paths] == ["00000-42.png", "00001-43.png"]
    more = save_result(pipe.generate("x", steps=1, seed=7), tmp_path)
    assert more[0].name == "00002-7.png"
    assert not list(tmp_path.glob(".*.tmp"))
    params = parse_infotext(read_infotext(paths[1]))
    assert params["Prompt"] == "a red circle, big" and params["Negative prompt"] == "blur"
    assert (params["Steps"], params["Sampler"], params["CFG scale"], params["Seed"]) == (2, "Euler a", 6.5, 43)
    assert (params["width"], params["height"], params["Model"]) == (64, 64, "tiny")
    assert "Schedule type" not in params  # Automatic is not written
    with Image.open(paths[0]) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
