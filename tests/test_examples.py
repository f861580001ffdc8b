"""The hand-written tutorial loop in examples/ must give the same image as generate()."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "handwritten_loop.py"


def load_example():
    spec = importlib.util.spec_from_file_location("handwritten_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M Karras", "PNDM"])
def test_handwritten_loop_matches_generate(pipe, sampler: str) -> None:
    example = load_example()
    settings = dict(negative_prompt="blurry", seed=21, steps=6, guidance_scale=5.0, sampler=sampler)
    by_hand = example.handwritten_txt2img(pipe, "a green triangle", **settings)
    generated = pipe.generate("a green triangle", **settings).images[0]
    difference = np.abs(np.asarray(by_hand, dtype=np.int16) - np.asarray(generated, dtype=np.int16))
    assert difference.max() == 0
