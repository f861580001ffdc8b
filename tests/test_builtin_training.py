"""A short training run on a tiny configuration: the loss goes down, a stopped run resumes exactly."""

import json

import pytest
import torch

import dapple
from dapple.train.builtin_model import TINY_ARCHITECTURE
from dapple.train.builtin_training import BuiltinTrainer, TrainingConfig

CONFIG = TrainingConfig(
    architecture=TINY_ARCHITECTURE, vae_steps=40, vae_batch_size=8, vae_learning_rate=3e-3, vae_warmup_steps=5,
    diffusion_steps=40, diffusion_batch_size=16, diffusion_learning_rate=2e-3, warmup_steps=5,
    scene_pool=128, checkpoint_every=7, log_every=10,
)
PROBE = 10**6  # a batch index no run reaches: a fixed held-aside batch to measure the loss on


def test_training_lowers_the_loss_and_exports_a_loadable_model(tmp_path) -> None:
    trainer = BuiltinTrainer(tmp_path / "run", CONFIG)
    with torch.no_grad():
        vae_before = trainer.vae_loss(PROBE).item()
    assert trainer.run(progress=False, stop_after=CONFIG.vae_steps) is None  # stops right after stage 1
    with torch.no_grad():
        vae_after = trainer.vae_loss(PROBE).item()
    assert vae_after < 0.7 * vae_before

    trainer = BuiltinTrainer(tmp_path / "run", CONFIG)  # resumes at the start of stage 2
    assert trainer.stage == "diffusion" and trainer.step == 0
    specs, pool, weights = trainer.scene_pool()
    with torch.no_grad():
        before = sum(trainer.diffusion_loss(PROBE + i, specs, pool, weights).item() for i in range(4))
    model_dir = trainer.run(progress=False)
    with torch.no_grad():
        after = sum(trainer.diffusion_loss(PROBE + i, specs, pool, weights).item() for i in range(4))
    assert after < before

    pipe = dapple.load(model_dir, device="cpu")
    assert {"circle", "left", "background"} <= pipe.components.vocabulary
    assert pipe.generate("a red circle on a blue background", steps=2, seed=1).images[0].size == (64, 64)
    assert (tmp_path / "run" / "train.log").read_text().count('"stage": "diffusion"') >= 4
    # Samplers get the schedule it was trained on: v-prediction on zero-terminal-SNR betas, from t=999.
    schedule = pipe.components.scheduler_config
    assert schedule["prediction_type"] == "v_prediction" and schedule["rescale_betas_zero_snr"] is True
    assert schedule["timestep_spacing"] == "trailing"


def test_a_share_of_timesteps_comes_from_the_top_of_the_schedule(tmp_path) -> None:
    """Position is decided near t=999; uniform timesteps leave that region almost untrained."""
    trainer = BuiltinTrainer(tmp_path / "run", CONFIG)
    share = trainer.high_timestep_share(0)
    timesteps = trainer.sample_timesteps(20000, torch.Generator().manual_seed(0), share)
    assert 0 <= int(timesteps.min()) and int(timesteps.max()) <= 999
    top = CONFIG.high_timestep_from
    expected = share + (1 - share) * (1000 - top) / 1000
    assert abs(float((timesteps >= top).float().mean()) - expected) < 0.02
    assert float((timesteps < 100).float().mean()) > 0.03  # the rest still covers the whole schedule


def test_the_top_share_falls_from_start_to_end_over_the_run(tmp_path) -> None:
    trainer = BuiltinTrainer(tmp_path / "run", CONFIG)
    last = CONFIG.diffusion_steps - 1
    assert trainer.high_timestep_share(0) == CONFIG.high_timestep_share
    assert abs(trainer.high_timestep_share(last) - CONFIG.high_timestep_share_end) < 1e-9
    middle = trainer.high_timestep_share(last // 2)
    assert CONFIG.high_timestep_share_end < middle < CONFIG.high_timestep_share


def test_the_loss_weighs_the_cells_a_shape_touches_more(tmp_path) -> None:
    from dapple.train.data.shapes import ShapesWorld

    trainer = BuiltinTrainer(tmp_path / "run", CONFIG)
    scene = ShapesWorld(seed=0).scene(0)
    weights = trainer.object_weights([scene.mask], 16)[0, 0]
    mask_rows, mask_cols = scene.mask.nonzero()
    assert weights[int(mask_rows.mean()) // 4, int(mask_cols.mean()) // 4] == 1 + CONFIG.object_loss_weight
    grown = weights > 1  # the shape's cells and a ring of one cell around them
    rows, cols = torch.nonzero(grown, as_tuple=True)
    assert int(rows.min()) == max(mask_rows.min() // 4 - 1, 0)
    assert int(cols.max()) == min(mask_cols.max() // 4 + 1, 15)
    assert float(weights[~grown].max()) == 1.0 and int(grown.sum()) < 16 * 16 // 2


def test_stage_two_can_start_from_an_exported_vae(tmp_path) -> None:
    from typer.testing import CliRunner

    from dapple.interfaces.cli import app

    config = TrainingConfig(**{**CONFIG.__dict__, "vae_steps": 3, "diffusion_steps": 2})
    donor = BuiltinTrainer(tmp_path / "donor", config)
    donor.run(progress=False)
    reuse = TrainingConfig(**{**config.__dict__, "vae_from": str(tmp_path / "donor" / "model")})
    trainer = BuiltinTrainer(tmp_path / "run", reuse)
    assert (trainer.stage, trainer.step) == ("diffusion", 0)  # stage 1 is skipped
    assert trainer.vae.config.scaling_factor == donor.vae.config.scaling_factor
    for name, tensor in donor.vae.state_dict().items():  # the export is fp16: equal to fp16 precision
        if name.startswith("quant_conv."):  # export calibrated the log-variance half (vae_posterior.py)
            tensor = tensor[:len(tensor) // 2]
        loaded = trainer.vae.state_dict()[name][:len(tensor)]
        assert torch.allclose(tensor, loaded, rtol=1e-3, atol=1e-3), name
    assert trainer.run(progress=False).is_dir()
    exported = CliRunner().invoke(app, ["train", "export", "--run", str(tmp_path / "run"), "--out",
                                        str(tmp_path / "model")])
    assert exported.exit_code == 0, exported.output
    assert f"--vae-from {tmp_path / 'donor' / 'model'}" in (tmp_path / "model" / "README.md").read_text()

    nothing = TrainingConfig(**{**config.__dict__, "vae_from": str(tmp_path)})
    try:
        BuiltinTrainer(tmp_path / "other", nothing)
    except ValueError as error:
        assert "holds no VAE" in str(error)
    else:
        raise AssertionError("a folder without a VAE was accepted")


def test_a_run_can_fine_tune_an_exported_model(tmp_path) -> None:
    from typer.testing import CliRunner

    from dapple.interfaces.cli import app

    config = TrainingConfig(**{**CONFIG.__dict__, "vae_steps": 3, "diffusion_steps": 4})
    donor = BuiltinTrainer(tmp_path / "donor", config)
    donor_folder = donor.run(progress=False)
    exported = CliRunner().invoke(app, ["train", "export", "--run", str(tmp_path / "donor"), "--out",
                                        str(donor_folder)])  # gives the donor a card with its recipe
    assert exported.exit_code == 0, exported.output

    tuned = TrainingConfig(**{**config.__dict__, "init_from": str(donor_folder), "diffusion_learning_rate": 5e-4})
    trainer = BuiltinTrainer(tmp_path / "run", tuned)
    assert (trainer.stage, trainer.step) == ("diffusion", 0)
    donor.ema_unet.copy_to(donor.unet.parameters())  # the folder holds the donor's EMA weights, in fp16
    for name, tensor in donor.unet.state_dict().items():
        assert torch.allclose(tensor, trainer.unet.state_dict()[name], rtol=1e-3, atol=1e-3), name
    fresh = BuiltinTrainer(tmp_path / "fresh", config)
    assert not all(torch.equal(a, b) for a, b in zip(fresh.unet.parameters(), trainer.unet.parameters()))
    shadow = trainer.ema_unet.shadow_params  # the EMA starts from the loaded weights, not from random ones
    assert all(torch.equal(a, b) for a, b in zip(shadow, trainer.unet.parameters()))
    assert trainer.run(progress=False).is_dir()

    result = CliRunner().invoke(app, ["train", "export", "--run", str(tmp_path / "run"), "--out",
                                      str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "model" / "README.md").read_text()
    assert f"--init-from {donor_folder}" in card and "--set diffusion_learning_rate=0.0005" in card
    assert f"dapple train builtin --out {tmp_path / 'donor'}" in card  # the donor's recipe, from its card

    both = TrainingConfig(**{**tuned.__dict__, "vae_from": str(donor_folder)})
    try:
        BuiltinTrainer(tmp_path / "both", both)
    except ValueError as error:
        assert "not both" in str(error)
    else:
        raise AssertionError("vae_from and init_from together were accepted")


def test_set_options_name_config_fields_and_recreate_the_config() -> None:
    from dapple.train.builtin_training import config_overrides, config_settings

    overrides = config_overrides(["diffusion_learning_rate=3e-4", "object_loss_weight=6", "zero_terminal_snr=false",
                                  "prediction_type=epsilon"])
    assert overrides == {"diffusion_learning_rate": 3e-4, "object_loss_weight": 6.0, "zero_terminal_snr": False,
                         "prediction_type": "epsilon"}
    assert type(overrides["object_loss_weight"]) is float  # "6" is a float field's value
    config = TrainingConfig(**overrides)
    assert TrainingConfig(**config_overrides(config_settings(config))) == config
    assert config_settings(TrainingConfig()) == []
    for bad, message in [("no_such_field=1", "NAME one of"), ("seed=3", "NAME one of"), ("scene_pool=1.5", "int"),
                         ("min_snr_gamma=high", "float"), ("ema_power", "NAME=VALUE")]:
        try:
            config_overrides([bad])
        except ValueError as error:
            assert message in str(error) and bad in str(error), (bad, str(error))
        else:
            raise AssertionError(f"--set {bad} was accepted")


def test_the_train_command_refuses_an_unknown_setting(tmp_path) -> None:
    from typer.testing import CliRunner

    from dapple.interfaces.cli import app

    result = CliRunner().invoke(app, ["train", "builtin", "--out", str(tmp_path / "run"), "--set", "lr=1"])
    assert result.exit_code == 2 and "diffusion_learning_rate" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_stopped_run_resumes_to_the_same_weights(tmp_path) -> None:
    config = TrainingConfig(**{**CONFIG.__dict__, "vae_steps": 6, "diffusion_steps": 12})
    straight = BuiltinTrainer(tmp_path / "straight", config)
    straight.run(progress=False)

    interrupted = BuiltinTrainer(tmp_path / "interrupted", config)
    interrupted.run(progress=False, stop_after=4)  # mid-VAE
    resumed = BuiltinTrainer(tmp_path / "interrupted", config)
    assert (resumed.stage, resumed.step) == ("vae", 4)
    resumed.run(progress=False, stop_after=9)  # finishes the VAE, stops mid-diffusion
    resumed = BuiltinTrainer(tmp_path / "interrupted", config)
    assert resumed.stage == "diffusion" and resumed.step > 0
    resumed.run(progress=False)

    for name, tensor in straight.unet.state_dict().items():
        assert torch.equal(tensor, resumed.unet.state_dict()[name]), name
    for name, tensor in straight.vae.state_dict().items():
        assert torch.equal(tensor, resumed.vae.state_dict()[name]), name


def test_resuming_with_another_config_is_refused(tmp_path) -> None:
    BuiltinTrainer(tmp_path / "run", CONFIG).run(progress=False, stop_after=1)
    other = TrainingConfig(**{**CONFIG.__dict__, "seed": 1})
    try:
        BuiltinTrainer(tmp_path / "run", other)
    except ValueError as error:
        assert "different training config" in str(error)
    else:
        raise AssertionError("a different config was accepted")


def test_a_checkpoint_from_before_a_new_config_field_still_resumes(tmp_path) -> None:
    from dapple.train.checkpoint import load_checkpoint, save_checkpoint

    trainer = BuiltinTrainer(tmp_path / "run", CONFIG)
    trainer.run(progress=False, stop_after=2)
    state = load_checkpoint(trainer.checkpoint_path)
    older = json.loads(state["config"])
    del older["init_from"]  # as written before the field existed
    save_checkpoint(trainer.checkpoint_path, {**state, "config": json.dumps(older)})
    assert BuiltinTrainer(tmp_path / "run", CONFIG).step == 2
    with pytest.raises(ValueError, match="different training config"):  # a non-default value is still a change
        BuiltinTrainer(tmp_path / "run", TrainingConfig(**{**CONFIG.__dict__, "init_from": str(tmp_path)}))


def test_export_writes_a_run_in_progress_as_a_model_folder(tmp_path) -> None:
    from typer.testing import CliRunner

    from dapple.interfaces.cli import app

    config = TrainingConfig(**{**CONFIG.__dict__, "vae_steps": 3, "diffusion_steps": 12})
    BuiltinTrainer(tmp_path / "run", config).run(progress=False, stop_after=5)  # 2 steps into stage 2
    result = CliRunner().invoke(app, ["train", "export", "--run", str(tmp_path / "run"), "--out",
                                      str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    assert "stage diffusion, step 2" in result.stderr
    assert dapple.load(tmp_path / "model", device="cpu").generate("a red circle", steps=1, seed=1).images
    card = (tmp_path / "model" / "README.md").read_text()
    assert "stopped in stage diffusion at step 2 of 12" in card and "--stop-after 5" in card
    assert "circle, green" in card  # the vocabulary
    missing = CliRunner().invoke(app, ["train", "export", "--run", str(tmp_path / "none"), "--out", "x"])
    assert missing.exit_code == 2 and "holds no checkpoint.pt" in missing.stderr


def test_export_with_an_evaluation_recommends_the_evaluated_settings(tmp_path) -> None:
    from typer.testing import CliRunner

    from dapple.interfaces.cli import app

    config = TrainingConfig(**{**CONFIG.__dict__, "vae_steps": 2, "diffusion_steps": 2})
    BuiltinTrainer(tmp_path / "run", config).run(progress=False)
    result = CliRunner().invoke(app, ["train", "export", "--run", str(tmp_path / "run"), "--out",
                                      str(tmp_path / "model"), "--eval", "2", "--sampler", "Euler", "--cfg", "4",
                                      "--guidance-min-t", "500"])
    assert result.exit_code == 0, result.output
    assert dapple.load(tmp_path / "model", device="cpu").components.generation_defaults == {
        "sampler": "Euler", "steps": 20, "guidance_scale": 4.0, "guidance_min_timestep": 500}
    card = (tmp_path / "model" / "README.md").read_text()
    assert "--eval 2 --sampler \"Euler\" --cfg 4 --guidance-min-t 500" in card
    assert "`generation_defaults.json` makes these the settings" in card


def test_training_minutes_leave_out_the_pauses_of_a_resumed_run(tmp_path) -> None:
    from dapple.train.model_card import training_minutes

    records = [("vae", 50, 0), ("vae", 100, 60), ("diffusion", 50, 120), ("diffusion", 100, 180),
               ("diffusion", 150, 180 + 3600), ("diffusion", 200, 3840), ("diffusion", 250, 3900)]
    log = tmp_path / "train.log"
    log.write_text("".join(json.dumps({"time": t, "stage": s, "step": n}) + "\n" for s, n, t in records))
    assert training_minutes(log) == {"vae": 1.0, "diffusion": 3.0}  # the hour-long pause is not training
    assert training_minutes(log, "diffusion", 200) == {"vae": 1.0, "diffusion": 2.0}
