"""The inspection lab on tiny random components: every command writes pictures that open, with the expected
sizes and frame counts, and prints the numbers that are deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dapple.inspect import (compression_ratio, denoise_steps, embeddings, forward_noise, noise_schedule,
                            parameter_grid, token_table, unet_call, vae_round_trip)
from dapple.interfaces.cli import app
from dapple.train.data.shapes import images_psnr
from sample_images import smooth_image


def test_compression_ratio_of_stable_diffusion_is_48() -> None:
    assert compression_ratio((3, 512, 512), (4, 64, 64)) == 48
    assert compression_ratio((3, 64, 64), (4, 16, 16)) == 12  # the built-in model's VAE (factor 4)


def test_token_table_counts_the_slots(pipe) -> None:
    rows, used, limit = token_table(pipe.tokenizer, "a red circle")
    assert [token for _, _, token in rows] == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    assert (used, limit) == (5, 77)


def test_embeddings_figure_and_similarity(pipe, tmp_path) -> None:
    same = embeddings(pipe, "a red circle", tmp_path, vs="a red circle")
    assert same.numbers["cosine"] == pytest.approx(1.0, abs=1e-5)
    other = embeddings(pipe, "a red circle", tmp_path, vs="a blue square on a green background")
    assert other.numbers["cosine"] < 0.9999
    assert (same.numbers["sequence"], same.numbers["hidden"]) == (77, 32)
    assert Image.open(other.files[0]).size == (1200, 450)


def test_schedule_plot_lists_each_samplers_timesteps(pipe, tmp_path) -> None:
    result = noise_schedule(pipe.components.scheduler_config, tmp_path, ["Euler", "DDIM", "DPM++ 2M Karras"], 10)
    assert Image.open(result.files[0]).size == (1500, 450)
    assert sum(line.startswith(("Euler:", "DDIM:", "DPM++ 2M Karras:")) for line in result.lines) == 3
    assert result.numbers["alphas_cumprod_first"] == pytest.approx(1 - 0.00085, abs=1e-6)


def test_vae_round_trip_reports_its_psnr_and_ratio(pipe, tmp_path) -> None:
    image = smooth_image(3)
    result = vae_round_trip(pipe, image, tmp_path)
    assert result.numbers["compression"] == 3  # the tiny VAE: 3x64x64 -> 4x32x32
    with torch.inference_mode():
        pixels = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.components.latent_scaling_factor
    expected = images_psnr(image, pipe.decode_latents(latents)[0])
    assert result.numbers["psnr"] == pytest.approx(expected, abs=1e-9)
    with torch.inference_mode():  # the sampled column: diffusers' own posterior sample with the same seed
        sample = pipe.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
    expected = images_psnr(image, pipe.decode_latents(sample * pipe.components.latent_scaling_factor)[0])
    assert result.numbers["psnr_sampled"] == pytest.approx(expected, abs=1e-6)
    sheet = Image.open(result.files[0])
    assert sheet.width > 8 * 128 and sheet.height > 128  # 4 pictures + 4 latent channels, enlarged


def test_forward_noise_grid_has_a_row_per_space(pipe, tmp_path) -> None:
    result = forward_noise(pipe, smooth_image(1), tmp_path, timesteps=(0, 500, 999))
    sheet = Image.open(result.files[0])
    assert sheet.width > 3 * 128 and 2 * 128 < sheet.height < 3 * 128 + 60


def test_denoise_writes_a_gif_with_a_frame_per_step(pipe, tmp_path) -> None:
    result = denoise_steps(pipe, "a red circle", tmp_path, steps=5, sampler="Euler", frame_size=64)
    gif = Image.open(tmp_path / "denoise.gif")
    assert gif.n_frames == 6 == result.numbers["frames"]  # 5 steps and the final image
    assert gif.size == (132, 64)
    assert Image.open(tmp_path / "denoise-steps.png").width > 5 * 128
    assert Image.open(tmp_path / "denoise-stats.png").size == (700, 400)


def test_grid_has_one_cell_per_value_pair(pipe, tmp_path) -> None:
    result = parameter_grid(pipe, "a red circle", tmp_path, ("guidance_scale", [1, 7]), ("steps", [2, 3, 4]))
    assert result.numbers["images"] == 6
    sheet = Image.open(result.files[0])
    assert sheet.width >= 2 * 128 and sheet.height >= 3 * 128


def test_unet_call_predicts_noise_and_x0(pipe, tmp_path) -> None:
    result = unet_call(pipe, smooth_image(2), "a red circle", 300, tmp_path)
    assert result.files[0].name == "unet-t300.png" and result.numbers["noise_mse"] > 0
    assert Image.open(result.files[0]).width >= 4 * 128


@pytest.mark.parametrize("args, files", [
    (["embeddings", "a red circle", "--vs", "a blue square"], ["embeddings.png"]),
    (["schedule", "--sampler", "Euler a,UniPC", "--steps", "8"], ["schedule.png"]),
    (["vae", "PIC"], ["vae.png"]),
    (["noise", "PIC", "--timesteps", "0,400,999"], ["noise.png"]),
    (["denoise", "a red circle", "--steps", "3"], ["denoise.gif", "denoise-steps.png", "denoise-stats.png"]),
    (["guidance", "a red circle", "--scales", "1,8", "--samplers", "Euler,DDIM"], ["grid-guidance_scale-sampler.png"]),
    (["unet", "PIC", "a red circle", "--t", "250"], ["unet-t250.png"]),
])
def test_inspect_commands_print_the_files_they_write(args, files, tiny_model_dir, tmp_path) -> None:
    smooth_image(4).save(tmp_path / "pic.png")
    args = [str(tmp_path / "pic.png") if a == "PIC" else a for a in args]
    model = [] if args[0] == "schedule" else ["--model", str(tiny_model_dir)]
    result = CliRunner().invoke(app, ["inspect", *args, *model, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(tmp_path / "out" / name) for name in files]
    for name in files:
        Image.open(tmp_path / "out" / name).verify()


@pytest.mark.parametrize("args, message", [
    (["guidance", "x"], "give one or two of"),
    (["guidance", "x", "--scales", "1,a"], "comma-separated list of float"),
    (["noise", "PIC", "--timesteps", "0,1000"], "allowed: comma-separated integers in 0..999"),
    (["unet", "PIC", "x", "--t", "1000"], "t=1000 is invalid; allowed: 0..999"),
    (["schedule", "--sampler", "Euler b"], "unknown sampler 'Euler b'"),
])
def test_inspect_bad_input_is_one_line(args, message, tiny_model_dir, tmp_path) -> None:
    smooth_image(4).save(tmp_path / "pic.png")
    args = [str(tmp_path / "pic.png") if a == "PIC" else a for a in args]
    model = [] if args[0] == "schedule" else ["--model", str(tiny_model_dir)]
    result = CliRunner().invoke(app, ["inspect", *args, *model, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_unet_call_reads_noise_and_x0_back_from_either_prediction_type(tiny_model_dir, tmp_path,
                                                                       prediction_type) -> None:
    """An oracle UNet that returns the exact target (the noise, or v = sqrt(abar) eps - sqrt(1 - abar) x0) must
    give a predicted-noise error of zero: the figure converts v back to noise and x0 correctly, even at t=999 of
    a zero-terminal-SNR schedule."""
    import dapple
    from dapple.samplers import create_scheduler

    oracle_pipe = dapple.load(tiny_model_dir, device="cpu")
    config = oracle_pipe.components.scheduler_config
    config.update(prediction_type=prediction_type, rescale_betas_zero_snr=prediction_type == "v_prediction")
    schedule = create_scheduler("DDPM", config)
    image = smooth_image(2)
    from dapple.inspect.vae import _encode

    latents = _encode(oracle_pipe, image)  # what unet_call noises

    def oracle(sample, timestep, encoder_hidden_states):
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(0))
        target = noise if prediction_type == "epsilon" else schedule.get_velocity(latents, noise, timestep)
        return type("Output", (), {"sample": target})()

    oracle_pipe.components.unet.forward = oracle
    for t in (300, 999 if prediction_type == "v_prediction" else 900):
        result = unet_call(oracle_pipe, image, "a red circle", t, tmp_path)
        assert result.numbers["noise_mse"] == pytest.approx(0.0, abs=1e-4), t
