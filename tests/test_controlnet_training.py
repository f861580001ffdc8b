"""The built-in ControlNet's recipe on a tiny base model: training lowers the loss, a stopped run resumes bit for bit,
the export is a diffusers ControlNetModel folder; and, on the shipped weights, held-out edge maps decide the shape
and place while weight 0 is the plain built-in model."""

import json
from dataclasses import asdict

import pytest
import torch
from diffusers import ControlNetModel
from typer.testing import CliRunner

from dapple.train.builtin_model import TINY_ARCHITECTURE, export_diffusers_folder
from dapple.train.builtin_training import TrainingConfig, builtin_schedule_config
from dapple.train.controlnet_training import (
    ControlNetConfig, ControlNetTrainer, colours_caption, config_overrides, config_settings, stored_config,
)
from dapple.train.data.shapes import held_out_combinations

PROBE = 10**6  # a batch index no run reaches


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A random tiny model of the built-in architecture (64 px -> 16x16 latents), on the built-in schedule."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base") / "tiny"
    arch = TINY_ARCHITECTURE
    return export_diffusers_folder(folder, arch.build_vae().eval(), arch.build_text_encoder().eval(),
                                   arch.build_unet().eval(), torch.float32,
                                   scheduler_config=builtin_schedule_config(TrainingConfig()))


def tiny_config(base, **changes) -> ControlNetConfig:
    values = dict(base=str(base), conditioning_channels=(4, 8, 8), steps=8, batch_size=4, learning_rate=3e-3,
                  warmup_steps=2, scene_pool=48, checkpoint_every=3, log_every=2)
    return ControlNetConfig(**{**values, **changes})


def test_training_lowers_the_loss_and_exports_a_diffusers_controlnet(tiny_base, tmp_path) -> None:
    config = tiny_config(tiny_base, steps=20)
    trainer = ControlNetTrainer(tmp_path / "run", config)
    frozen = {name: tensor.clone() for name, tensor in trainer.unet.state_dict().items()}
    with torch.no_grad():
        before = sum(trainer.loss(PROBE + i).item() for i in range(3))
    model_dir = trainer.run(progress=False)
    with torch.no_grad():
        after = sum(trainer.loss(PROBE + i).item() for i in range(3))
    assert after < before
    assert all(torch.equal(frozen[name], tensor) for name, tensor in trainer.unet.state_dict().items())

    loaded = ControlNetModel.from_pretrained(str(model_dir))  # diffusers' own loader is the oracle
    assert tuple(loaded.config.conditioning_embedding_out_channels) == (4, 8, 8)
    assert loaded.dtype == torch.float32
    ema = trainer.ema_controlnet().state_dict()
    assert all(torch.equal(ema[name], tensor) for name, tensor in loaded.state_dict().items())
    # The EMA moved away from the start: the zero convolutions are no longer zero.
    assert float(loaded.controlnet_mid_block.weight.detach().abs().max()) > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "train.log").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(2, 21, 2))


def test_a_stopped_run_resumes_to_the_same_weights_bit_for_bit(tiny_base, tmp_path) -> None:
    config = tiny_config(tiny_base, steps=6)
    whole = ControlNetTrainer(tmp_path / "whole", config)
    whole.run(progress=False)

    assert ControlNetTrainer(tmp_path / "split", config).run(progress=False, stop_after=4) is None
    resumed = ControlNetTrainer(tmp_path / "split", config)
    assert resumed.step == 4
    resumed.run(progress=False)
    for a, b in ((whole.controlnet, resumed.controlnet), (whole.ema_controlnet(), resumed.ema_controlnet())):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[name], sb[name]) for name in sa)

    with pytest.raises(ValueError, match="different ControlNet training config"):
        ControlNetTrainer(tmp_path / "split", tiny_config(tiny_base, steps=6, learning_rate=1e-3))
    assert ControlNetTrainer.from_run(tmp_path / "split").config == config

    # A continuation starts from the exported (EMA) weights, its EMA too.
    follow = ControlNetTrainer(tmp_path / "follow", tiny_config(tiny_base, init_from=str(tmp_path / "whole" / "model")))
    exported = whole.ema_controlnet().state_dict()
    for network in (follow.controlnet, follow.ema_controlnet()):
        assert all(torch.equal(exported[name], tensor) for name, tensor in network.state_dict().items())
    with pytest.raises(ValueError, match="not a ControlNet folder"):
        ControlNetTrainer(tmp_path / "bad", tiny_config(tiny_base, init_from=str(tmp_path)))


def test_batches_are_pure_functions_of_seed_and_step_with_the_caption_mix(tiny_base, tmp_path) -> None:
    config = tiny_config(tiny_base, batch_size=64, scene_pool=64)
    trainer = ControlNetTrainer(tmp_path / "run", config)
    latents, control, captions, _ = trainer.batch(5)
    again = ControlNetTrainer(tmp_path / "other", config).batch(5)
    assert torch.equal(latents, again[0]) and torch.equal(control, again[1]) and captions == again[2]
    assert control.shape == (64, 3, 64, 64) and 0 <= float(control.min()) and float(control.max()) == 1.0
    kinds = {"empty": 0, "colours": 0, "full": 0}
    for step in range(20):
        for caption in trainer.batch(step)[2]:
            kinds["empty" if not caption else "colours" if " shape " in caption else "full"] += 1
    total = sum(kinds.values())
    assert abs(kinds["colours"] / total - config.colours_caption_share) < 0.05
    assert abs(kinds["full"] / total - config.full_caption_share) < 0.05
    assert abs(kinds["empty"] / total - config.empty_caption_share()) < 0.05
    # Training scenes never come from a held-out combination (those are the evaluation's).
    assert not {spec.combination for spec in trainer.scene_pool()[0]} & held_out_combinations()


def test_config_settings_round_trip_and_bad_settings_name_what_is_allowed() -> None:
    config = ControlNetConfig(learning_rate=1e-4, conditioning_channels=(8, 16, 32), full_caption_share=0.3)
    overrides = config_overrides(config_settings(config))
    assert ControlNetConfig(**overrides) == config
    assert stored_config(json.loads(json.dumps(config.as_dict()))) == config
    with pytest.raises(ValueError, match="NAME one of: .*learning_rate"):
        config_overrides(["learning_rat=1"])
    with pytest.raises(ValueError, match="learning_rate takes float values"):
        config_overrides(["learning_rate=fast"])
    assert colours_caption("red", "blue") == "a red shape on a blue background"


def test_cli_trains_resumes_and_evaluates(tiny_base, tmp_path) -> None:
    from dapple.interfaces.cli import app

    runner = CliRunner()
    run = tmp_path / "run"
    common = ["train", "controlnet", "--out", str(run), "--base", str(tiny_base), "--steps", "3", "--batch-size", "2",
              "--set", "scene_pool=8", "--set", "conditioning_channels=[4, 8, 8]"]
    result = runner.invoke(app, [*common, "--stop-after", "2"])
    assert result.exit_code == 0, result.output
    assert "stopped" in result.output
    result = runner.invoke(app, common)
    assert result.exit_code == 0, result.output
    assert "step 2 of 3" in result.output and (run / "model" / "config.json").is_file()

    result = runner.invoke(app, [*common[:-2], "--set", "learning_rate=1"])
    assert result.exit_code != 0 and "different ControlNet training config" in result.output

    grid = tmp_path / "grid.png"
    result = runner.invoke(app, ["eval", "controlnet", "--model", str(run / "model"), "--base", str(tiny_base),
                                 "--n", "2", "--grid", str(grid), "--card", "--run", str(run)])
    assert result.exit_code == 0, result.output
    assert "ControlNet weight 1:" in result.output and "ControlNet weight 0:" in result.output
    assert grid.is_file()
    card = (run / "model" / "README.md").read_text()
    assert "dapple train controlnet --out" in card and "| no control (weight 0) | 2 |" in card


# -- the shipped weights -------------------------------------------------------------------------------------------
def _shipped():
    from dapple.models.control_models import BUILTIN_CONTROLNET_DIR

    return BUILTIN_CONTROLNET_DIR if (BUILTIN_CONTROLNET_DIR / "config.json").is_file() else None


@pytest.mark.skipif(_shipped() is None, reason="the built-in ControlNet is not shipped yet")
def test_the_shipped_controlnet_draws_held_out_edges_and_weight_0_is_the_plain_model() -> None:
    import dapple
    from dapple.train.controlnet_eval import generate_case, held_out_cases
    from dapple.train.scorer import score_image

    pipe = dapple.load(threads=1)
    # Other scenes than the model card's (seed 0). The card measures 88.5% of shape, place and colour right on 200;
    # with the ControlNet off, 0.5%. 18 of 24 leaves room for sampling noise and none for a ControlNet that fails.
    cases = held_out_cases(24, seed=500)
    right = 0
    for index, case in enumerate(cases):
        prediction = score_image(generate_case(pipe, "builtin-canny", case, 1.0, seed=index))
        right += (prediction.shape, prediction.position, prediction.colour) == (
            case.scene.spec.shape, case.scene.spec.position, case.scene.spec.colour)
    assert right >= 18, f"{right} of 24 held-out edge maps gave the right shape, place and colour"

    case = cases[0]
    plain = pipe.generate(case.prompt, seed=3).images[0]
    off = generate_case(pipe, "builtin-canny", case, 0.0, seed=3)
    assert plain.tobytes() == off.tobytes()
    assert generate_case(pipe, "builtin-canny", case, 1.0, seed=3).tobytes() != plain.tobytes()
    assert asdict(case.scene.spec)["shape"] in ("circle", "square", "triangle")
