"""Every sampler with every schedule type at 1-3 steps (A1111 clients ask for that: previews, LCM, turbo models):
an image with finite pixels, or a clear refusal naming the step count — never a crash or a NaN image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dapple
from dapple.errors import InvalidRequestError
from dapple.samplers import SAMPLERS

BUILTIN_SCHEDULER = Path(dapple.__file__).parent / "models" / "assets" / "builtin" / "scheduler" / \
    "scheduler_config.json"


@pytest.fixture(scope="module")
def zero_snr_pipe(tiny_model_dir):
    """The tiny model on the built-in model's schedule: zero terminal SNR, v-prediction, trailing spacing and a
    DDIM config without skip_prk_steps (where PLMS below 4 steps used to crash)."""
    pipe = dapple.load(tiny_model_dir, device="cpu")
    pipe.components.scheduler_config = json.loads(BUILTIN_SCHEDULER.read_text())
    return pipe


def outcomes(pipe, kinds) -> dict[tuple[str, int], str]:
    """(sampler name, steps) -> "ok" or the refusal's message, for every sampler and schedule type in kinds."""
    found = {}
    for spec in SAMPLERS:
        for kind in spec.schedule_types:
            if kinds is not None and kind not in kinds:
                continue
            name = spec.name if kind == "Automatic" else f"{spec.name} {kind}"
            for steps in (1, 2, 3):
                try:
                    result = pipe.generate("a red circle", steps=steps, seed=1, sampler=name)
                except InvalidRequestError as error:
                    found[name, steps] = str(error)
                    continue
                assert torch.isfinite(result.pixels).all(), (name, steps)
                assert result.pixels.std() > 0, (name, steps)
                found[name, steps] = "ok"
    return found


def test_every_sampler_and_schedule_type_at_1_to_3_steps_on_a_zero_terminal_snr_model(zero_snr_pipe) -> None:
    found = outcomes(zero_snr_pipe, None)
    assert all(found[f"PNDM{suffix}", steps] == "ok" for suffix in ("", " Uniform", " DDIM") for steps in (1, 2, 3))
    refused = {key: message for key, message in found.items() if message != "ok"}
    # Align Your Steps' tables are sigmas of SD's noise schedule, not of this one: refused for every sampler.
    tabulated = {key for key in refused if key[0].endswith("Align Your Steps")}
    assert tabulated == {(f"{spec.name} Align Your Steps", steps) for spec in SAMPLERS
                         if "Align Your Steps" in spec.schedule_types for steps in (1, 2, 3)}
    assert all("tabulated for SD 1.x/SDXL's noise schedule" in refused[key] for key in tabulated)
    refused = {key: message for key, message in refused.items() if key not in tabulated}
    # diffusers' DPM2 a cannot take an ancestral step from the first sigma (4096) straight to sigma(t=0): its
    # interpolated sigma is 0 and its timestep NaN. Refused, with what to do instead.
    assert set(refused) == {("DPM2 a Uniform", 2), ("DPM2 a Normal", 2)}
    for (name, steps), message in refused.items():
        assert message.startswith(f"steps={steps} is not possible with sampler {name!r}")
        assert "use more steps or another sampler or schedule type" in message
    assert len(found) == 3 * sum(len(spec.schedule_types) for spec in SAMPLERS)


def test_every_sampler_at_1_to_3_steps_on_an_sd15_schedule(pipe) -> None:
    found = outcomes(pipe, ("Automatic", "Align Your Steps"))
    assert set(found.values()) == {"ok"}
    assert ("PNDM", 1) in found and ("DPM++ 2M Align Your Steps", 1) in found and ("DPM2 a Align Your Steps", 2) \
        in found
