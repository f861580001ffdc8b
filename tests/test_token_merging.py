"""Token merging (engine/token_merging.py, ToMe for SD): ratio 0 is the loop bit for bit; the matching merges
exactly r = int(N * ratio) tokens (at most the sources) and, in closed form, unmerge(merge(x)) gives every merged
token its group's mean (checked against a slow reference of bipartite soft matching); ratio > 0 changes the image
but stays close, and a seed reproduces it (also inside a batch); the hires ratio acts on the hires pass only; the
A1111 settings map (override_settings, stored options, the img2img and hr ratios); bad values are refused (422
over HTTP, the flag's name on the command line); every hook is removed after a run, an error and a cancel."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import dapple
from dapple.engine.hooks import CancelToken
from dapple.engine.pipeline import speed_extensions
from dapple.engine.token_merging import (
    TokenMerging,
    bipartite_soft_matching_2d,
    destination_choice,
    finest_transformer_blocks,
    grid_at_level,
)
from dapple.errors import GenerationCancelled, InvalidRequestError
from dapple.request import make_request
from extension_fixtures import FailAt
from sample_images import smooth_image

FAST = {"prompt": "a red circle", "negative_prompt": "blurry", "seed": 5, "sampler": "Euler",
        "guidance_scale": 5.0, "steps": 4}


def hooks_left(unet) -> int:
    from diffusers.models.attention import BasicTransformerBlock

    count = 0
    for module in unet.modules():
        if isinstance(module, BasicTransformerBlock):
            for part in (module, module.attn1, module.attn2, module.ff):
                if part is not None:
                    count += len(part._forward_pre_hooks) + len(part._forward_hooks)
    return count


# -- the matching --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width", "ratio", "kept"), [
    (8, 8, 0.5, 32), (8, 8, 0.3, 64 - 19), (9, 7, 0.5, 63 - 31), (8, 8, 0.9, 16),  # 0.9: capped at the 48 sources
    (1, 5, 0.5, 5),  # no whole 2x2 cell: nothing to merge into
])
def test_merging_removes_int_n_times_ratio_tokens_and_unmerge_restores_the_shape(height, width, ratio, kept) -> None:
    x = torch.randn(3, height * width, 8, generator=torch.Generator().manual_seed(0))
    merge, unmerge = bipartite_soft_matching_2d(x, width, height, int(height * width * ratio))
    assert merge(x).shape == (3, kept, 8)
    assert unmerge(merge(x)).shape == x.shape


def reference_unmerge_merge(x: torch.Tensor, width: int, height: int, r: int) -> torch.Tensor:
    """Bipartite soft matching written out with loops (destination: the top-left token of each 2x2 cell): the r
    sources most similar to some destination join that destination; each group takes its mean; other tokens stay."""
    tokens = x.shape[0]
    dst = [row * width + col for row in range(0, height - height % 2, 2) for col in range(0, width - width % 2, 2)]
    src = [index for index in range(tokens) if index not in dst]
    unit = x / x.norm(dim=-1, keepdim=True)
    best = {s: max(dst, key=lambda d: float(unit[s] @ unit[d])) for s in src}
    similarity = {s: float(unit[s] @ unit[best[s]]) for s in src}
    merged = sorted(src, key=lambda s: -similarity[s])[:r]
    out = x.clone()
    for d in dst:
        group = [d] + [s for s in merged if best[s] == d]
        mean = x[group].mean(dim=0)
        for index in group:
            out[index] = mean
    return out


@pytest.mark.parametrize(("height", "width", "r"), [(4, 4, 6), (6, 4, 10), (5, 5, 7)])
def test_unmerge_of_merge_is_the_groups_mean_as_a_slow_reference_computes_it(height, width, r) -> None:
    x = torch.randn(1, height * width, 6, generator=torch.Generator().manual_seed(height * width + r))
    merge, unmerge = bipartite_soft_matching_2d(x, width, height, r)
    torch.testing.assert_close(unmerge(merge(x))[0], reference_unmerge_merge(x[0], width, height, r))


def test_tokens_equal_within_each_cell_merge_losslessly() -> None:
    cells = torch.randn(1, 4 * 4, 5, generator=torch.Generator().manual_seed(1))
    x = cells.view(1, 4, 4, 5).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(1, 64, 5)
    for seed in (0, 1):
        choice = destination_choice([torch.Generator().manual_seed(seed)], 1, 4, 4, 2, 2)
        merge, unmerge = bipartite_soft_matching_2d(x, 8, 8, 48, choice=choice)
        assert merge(x).shape == (1, 16, 5)
        torch.testing.assert_close(unmerge(merge(x)), x)
    merge, unmerge = bipartite_soft_matching_2d(x, 8, 8, 0)
    assert merge(x) is x and unmerge(x) is x  # r = 0 is the identity


def test_destinations_come_from_each_images_seed_and_both_halves_share_them() -> None:
    def draw(seeds, rows):
        return destination_choice([torch.Generator().manual_seed(s) for s in seeds], rows, 4, 4, 2, 2)

    assert torch.equal(draw([7], 1), draw([7], 1))
    assert not torch.equal(draw([7], 1), draw([8], 1))
    guided = draw([7, 8], 4)  # [uncond 7, uncond 8, cond 7, cond 8]
    assert torch.equal(guided[0], guided[2]) and torch.equal(guided[1], guided[3])
    assert torch.equal(guided[1], draw([8], 1)[0])  # image 1 of the batch is the single run of its seed


def test_the_finest_level_with_attention_is_chosen(pipe) -> None:
    from dapple.models.tiny import build_tiny_family_pipeline

    level, blocks = finest_transformer_blocks(pipe.unet)  # attention only in the second level (SDXL-like)
    assert level == 1 and len(blocks) == 2 + 1 + 3  # down, mid (its level too), up
    level, blocks = finest_transformer_blocks(build_tiny_family_pipeline("sd1", seed=4).unet)
    assert level == 0 and len(blocks) == 1 + 2
    assert grid_at_level(32, 24, 1) == (16, 12) and grid_at_level(9, 7, 2) == (3, 2)


# -- in the loop -----------------------------------------------------------------------------------------------


def test_ratio_0_is_the_loop_bit_for_bit_and_adds_nothing(pipe) -> None:
    assert speed_extensions(make_request(**FAST, token_merging_ratio=0.0)) == []
    assert speed_extensions(make_request(**FAST, token_merging_ratio_hr=0.5)) == []  # no hires pass: nothing
    plain = pipe.run(make_request(**FAST))
    off = pipe.run(make_request(**FAST, token_merging_ratio=0))
    assert torch.equal(plain.pixels, off.pixels)
    assert "Token merging" not in off.infotexts[0]


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_a_ratio_changes_the_image_within_bounds_and_a_seed_reproduces_it(pipe, ratio) -> None:
    plain = pipe.run(make_request(**FAST)).pixels
    merging = TokenMerging(ratio)
    merged = pipe.run(make_request(**FAST), extensions=[merging])
    assert merging.merged_calls == 4 * 6  # 4 steps x the 6 blocks of the finest level
    relative = (merged.pixels - plain).norm() / plain.norm()
    assert 0 < relative < 0.1, relative
    again = pipe.generate(**FAST, token_merging_ratio=ratio)  # the Python API's keyword
    assert torch.equal(again.pixels, merged.pixels)
    assert f"Token merging ratio: {ratio}" in again.infotexts[0]
    assert hooks_left(pipe.unet) == 0


def test_image_i_of_a_batch_is_the_single_run_of_seed_plus_i(pipe) -> None:
    batch = pipe.run(make_request(**FAST, batch_size=2, token_merging_ratio=0.5)).pixels
    single = pipe.run(make_request(**{**FAST, "seed": FAST["seed"] + 1}, token_merging_ratio=0.5)).pixels
    torch.testing.assert_close(batch[1:], single, atol=1e-4, rtol=0)


def test_the_sd1_layout_merges_its_first_blocks(tmp_path) -> None:
    from dapple.models.tiny import build_tiny_family_pipeline

    built = build_tiny_family_pipeline("sd1", seed=4)
    built.save_pretrained(str(tmp_path), safe_serialization=True)
    sd1 = dapple.load(tmp_path, device="cpu")
    plain = sd1.run(make_request(**FAST)).pixels
    merging = TokenMerging(0.5)
    merged = sd1.run(make_request(**FAST), extensions=[merging]).pixels
    assert merging.merged_calls == 4 * 3
    assert 0 < ((merged - plain).norm() / plain.norm()) < 0.1


def test_the_hires_ratio_acts_on_the_hires_pass_only(pipe) -> None:
    fields = dict(**FAST, hires_scale=2.0, hires_steps=2)
    merging = TokenMerging(0.0, 0.5)
    result = pipe.run(make_request(**fields), extensions=[merging])
    assert merging.merged_calls == 2 * 6  # the 2 hires steps, none of the 4 first-pass ones
    assert "Token merging ratio hr: 0.5" in result.infotexts[0] and "Token merging ratio:" not in result.infotexts[0]
    assert len(speed_extensions(make_request(**fields, token_merging_ratio_hr=0.5))) == 1
    both = TokenMerging(0.3, 0.0)  # hr 0: the hires pass uses the ratio too (A1111's rule)
    pipe.run(make_request(**fields), extensions=[both])
    assert both.merged_calls == (4 + 2) * 6


def test_img2img_merges_too(pipe) -> None:
    plain = pipe.img2img(smooth_image(2), **FAST, strength=0.75).pixels
    merged = pipe.img2img(smooth_image(2), **FAST, strength=0.75, token_merging_ratio=0.5)
    assert not torch.equal(plain, merged.pixels) and "Token merging ratio: 0.5" in merged.infotexts[0]


def test_every_hook_is_removed_after_an_error_and_a_cancel(pipe) -> None:
    with pytest.raises(RuntimeError, match="on purpose"):
        pipe.run(make_request(**FAST, token_merging_ratio=0.5, deep_cache_interval=2), extensions=[FailAt()])
    assert hooks_left(pipe.unet) == 0
    token = CancelToken()
    with pytest.raises(GenerationCancelled):
        pipe.run(make_request(**FAST, token_merging_ratio=0.5), cancel=token, callback=lambda context: token.cancel())
    assert hooks_left(pipe.unet) == 0
    assert all("forward" not in vars(block) for block in pipe.unet.up_blocks)


# -- values and interfaces -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-0.1, 0.95, 2, "half"])
def test_bad_ratios_are_refused_with_what_is_allowed(value) -> None:
    for name in ("token_merging_ratio", "token_merging_ratio_hr"):
        with pytest.raises(InvalidRequestError, match=rf"{name}=.*invalid"):
            make_request(**FAST, **{name: value})
    with pytest.raises(InvalidRequestError, match=r"token_merging_ratio must be a number from 0 \(off\) to 0.9"):
        TokenMerging(value)


def test_a1111_settings_map_to_the_ratios() -> None:
    from dapple.interfaces.a1111 import translate

    body = {"prompt": "x", "override_settings": {"token_merging_ratio": 0.5, "token_merging_ratio_hr": 0.3}}
    fields, ignored = translate(body, "txt2img")
    assert (fields["token_merging_ratio"], fields["token_merging_ratio_hr"]) == (0.5, 0.3)
    assert "override_settings" not in ignored
    fields, _ = translate({"prompt": "x"}, "txt2img", {"token_merging_ratio": 0.4})  # POST /options' setting
    assert fields["token_merging_ratio"] == 0.4
    fields, _ = translate({"prompt": "x", "override_settings": {"token_merging_ratio": 0.0}}, "txt2img",
                          {"token_merging_ratio": 0.4})
    assert fields["token_merging_ratio"] == 0.0  # the request's override wins
    img2img = {"prompt": "x", "init_images": ["aGk="],
               "override_settings": {"token_merging_ratio": 0.5, "token_merging_ratio_img2img": 0.2}}
    assert translate(img2img, "img2img")[0]["token_merging_ratio"] == 0.2
    assert translate({**body, "override_settings": {"token_merging_ratio": 0.5, "CLIP_stop_at_last_layers": 2}},
                     "txt2img")[1].count("override_settings") == 1  # a setting Dapple does not act on is named
    assert translate({"prompt": "x", "deep_cache_interval": 3}, "txt2img")[0]["deep_cache_interval"] == 3


def test_the_apis_carry_the_fields_and_refuse_bad_values_with_422(tmp_path, pipe) -> None:
    from fastapi.testclient import TestClient

    from dapple.interfaces.server import create_app
    from dapple.service.jobs import JobService

    service = JobService(tmp_path / "data", lambda: pipe, queue_size=2)
    service.start()
    try:
        with TestClient(create_app(service, model_name="tiny")) as client:
            body = {"prompt": "x", "steps": 2, "seed": 1, "sampler_name": "Euler"}
            answer = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"token_merging_ratio": 2}})
            assert answer.status_code == 422 and "token_merging_ratio" in answer.text, answer.text
            answer = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"token_merging_ratio": "x"}})
            assert answer.status_code == 422 and "token_merging_ratio" in answer.text, answer.text
            answer = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"token_merging_ratio": 0.5}})
            assert answer.status_code == 200, answer.text
            info = answer.json()["info"]
            assert "Token merging ratio: 0.5" in info and '"Token merging ratio": 0.5' in info
            answer = client.post("/api/v1/jobs", json={"prompt": "x", "steps": 2, "token_merging_ratio": 0.95})
            assert answer.status_code == 422 and "token_merging_ratio" in answer.text
            answer = client.post("/api/v1/jobs", json={"prompt": "x", "steps": 2, "token_merging_ratio": 0.5,
                                                       "deep_cache_interval": 2})
            assert answer.status_code == 202, answer.text
    finally:
        service.stop()


def test_the_command_line_flags(tiny_model_dir, tmp_path) -> None:
    from dapple.interfaces.cli import app
    from dapple.service.outputs import read_infotext

    runner = CliRunner()
    result = runner.invoke(app, ["generate", "a red circle", "--model", str(tiny_model_dir), "--out", str(tmp_path),
                                 "--seed", "1", "--steps", "2", "--deep-cache", "2", "--token-merging", "0.5"])
    assert result.exit_code == 0, result.output
    png = [line for line in result.stdout.splitlines() if line.endswith(".png")][0]
    text = read_infotext(png)
    assert "DeepCache interval: 2" in text and "Token merging ratio: 0.5" in text
    for flag, value in (("--token-merging", "0.95"), ("--deep-cache", "0")):
        result = runner.invoke(app, ["generate", "x", "--model", str(tiny_model_dir), "--out", str(tmp_path),
                                     flag, value])
        assert result.exit_code != 0 and f"{flag} {value}" in result.output, result.output
