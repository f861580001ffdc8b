"""Every sampler with every schedule type at 1-3 steps (A1111 clients ask for that: previews, LCM, turbo models):
an image with finite pixels, or a clear refusal naming the step count — never a crash or a NaN image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dapple
from dapple.errors import InvalidRequestError
from dapple.samplers import SAMPLERS, create_scheduler, resolve_sampler

BUILTIN_SCHEDULER = Path(dapple.__file__).parent / "models" / "assets" / "builtin" / "scheduler" / \
    "scheduler_config.json"


@pytest.fixture(scope="module")
def zero_snr_pipe(tiny_model_dir):
    """The tiny model on the built-in model's schedule: zero terminal SNR, v-prediction, trailing spacing and a
    DDIM config without skip_prk_steps (where PLMS below 4 steps used to crash)."""
    pipe = dapple.load(tiny_model_dir, device="cpu")
    pipe.components.scheduler_config = json.loads(BUILTIN_SCHEDULER.read_text())
    return pipe


def scheduler_key(pipe, name: str) -> tuple[str, str]:
    """What decides a run's sampling: the scheduler class and its whole config, as the pipeline builds them."""
    try:
        scheduler = create_scheduler(resolve_sampler(name), pipe.components.scheduler_config, seeds=[1])
    except InvalidRequestError:  # refused as it is built (Align Your Steps on another noise schedule): no twin
        return "refused", name
    return type(scheduler).__qualname__, json.dumps(dict(scheduler.config), sort_keys=True, default=repr)


def outcomes(pipe, kinds, twins: dict | None = None) -> dict[tuple[str, int], str]:
    """(sampler name, steps) -> "ok" or the refusal's message, for every sampler and schedule type in kinds.

    Schedule types that are the same diffusers setting (Polyexponential at rho 1 is Exponential, Normal is Uniform's
    linspace, Simple is SGM Uniform's trailing) give the same scheduler class and config, so the same computation:
    a twin of a combination that ran is not generated again (twins, when given, collects (sampler, schedule type)
    -> the twin's schedule type).
    Refusals are asked of the pipeline for every name, since their message names the sampler."""
    found: dict[tuple[str, int], str] = {}
    ran: dict[tuple[str, str], tuple[str, str]] = {}
    for spec in SAMPLERS:
        for kind in spec.schedule_types:
            if kinds is not None and kind not in kinds:
                continue
            name = spec.name if kind == "Automatic" else f"{spec.name} {kind}"
            key = scheduler_key(pipe, name)
            twin, twin_kind = ran.setdefault(key, (name, kind))
            if twin != name and twins is not None:
                twins[spec.name, kind] = twin_kind
            for steps in (1, 2, 3):
                if twin != name and found[twin, steps] == "ok":
                    found[name, steps] = "ok"  # the same scheduler class and config as `twin`, which ran
                    continue
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
    twins: dict[tuple[str, str], str] = {}
    found = outcomes(zero_snr_pipe, None, twins)
    # The only twins are schedule types that are another's diffusers setting; on this model's trailing spacing SGM
    # Uniform and Simple are Automatic for the classes without sigma switches. Every one of them twins Exponential,
    # Uniform, SGM Uniform or Automatic of the same sampler, which ran.
    same = {"Polyexponential": {"Exponential"}, "Normal": {"Uniform"}, "Simple": {"SGM Uniform", "Automatic"},
            "SGM Uniform": {"Automatic"}}
    assert all(twin in same.get(kind, ()) for (_, kind), twin in twins.items()), twins
    assert {kind for _, kind in twins} == set(same) and len(twins) == 46, twins  # 156 combinations, 110 generated
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
