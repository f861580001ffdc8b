"""Textual inversion: A1111 and diffusers embedding files, triggered by name, as diffusers applies them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

import dapple
from dapple.errors import ModelLoadError, PickleRefusedError
from dapple.infotext import parse_infotext
from dapple.models.hashing import model_sha256
from dapple.samplers import create_scheduler

RUN = dict(steps=3, seed=9, guidance_scale=6.0, width=64, height=64, sampler="DDIM")
VECTORS = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))  # the tiny text encoder is 32 wide


@pytest.fixture
def embeddings(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": VECTORS}, str(folder / "sparkle.safetensors"))  # A1111's safetensors layout
    torch.save({"string_to_param": {"*": VECTORS * 2}, "name": "glow", "step": 100}, str(folder / "glow.pt"))
    return folder


def test_an_embedding_draws_what_diffusers_load_textual_inversion_draws(tiny_model_dir, embeddings, tmp_path):
    pipe = dapple.load(tiny_model_dir, device="cpu", embedding_dirs=[embeddings])
    ours = pipe.generate("a sparkle circle", negative_prompt="blurry", **RUN)

    learned = tmp_path / "learned_embeds.safetensors"
    save_file({"sparkle": VECTORS}, str(learned))
    reference = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), local_files_only=True,
                                                        safety_checker=None, requires_safety_checker=False)
    reference.load_textual_inversion(str(learned), token="sparkle")
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = create_scheduler("DDIM", pipe.components.scheduler_config, seeds=[9])
    theirs = reference("a sparkle circle", negative_prompt="blurry", num_inference_steps=3, guidance_scale=6.0,
                       width=64, height=64, generator=torch.Generator().manual_seed(9), output_type="np").images
    assert np.abs(ours.pixels.permute(0, 2, 3, 1).numpy() - theirs).max() <= 1e-3

    parameters = parse_infotext(ours.infotexts[0])
    assert parameters["TI hashes"] == f"sparkle: {model_sha256(embeddings / 'sparkle.safetensors')[:12]}"
    assert "a sparkle circle" in ours.infotexts[0]  # the prompt as written


def test_prompts_without_the_name_are_untouched(tiny_model_dir, embeddings) -> None:
    plain = dapple.load(tiny_model_dir, device="cpu").generate("a sparkly circle", **RUN).pixels
    pipe = dapple.load(tiny_model_dir, device="cpu", embedding_dirs=[embeddings])
    pipe.generate("a sparkle circle", **RUN)  # installs it
    again = pipe.generate("a sparkly circle", **RUN)  # "sparkly" is another word
    assert torch.equal(again.pixels, plain)
    assert "TI hashes" not in parse_infotext(again.infotexts[0])
    weighted = pipe.generate("a (sparkle:1.3) circle", **RUN).pixels  # prompt weights apply to it too
    assert not torch.equal(weighted, pipe.generate("a sparkle circle", **RUN).pixels)


def test_pickle_embeddings_need_the_opt_in(tiny_model_dir, embeddings) -> None:
    with pytest.raises(PickleRefusedError, match="allow_pickle"):
        dapple.load(tiny_model_dir, device="cpu", embedding_dirs=[embeddings]).generate("a glow", **RUN)
    pipe = dapple.load(tiny_model_dir, device="cpu", embedding_dirs=[embeddings], allow_pickle=True)
    pipe.generate("a glow", **RUN)
    ids = pipe.tokenizer.convert_tokens_to_ids(["<ti-glow-0>", "<ti-glow-1>"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], VECTORS * 2)


def test_embeddings_for_another_model_are_refused_clearly(tiny_model_dir, tmp_path) -> None:
    save_file({"emb_params": torch.zeros(1, 768)}, str(tmp_path / "wide.safetensors"))
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(tmp_path / "xl.safetensors"))
    pipe = dapple.load(tiny_model_dir, device="cpu", embedding_dirs=[tmp_path])
    with pytest.raises(ModelLoadError, match="768-wide vectors; this model's text encoder takes 32"):
        pipe.generate("wide", **RUN)
    with pytest.raises(ModelLoadError, match="SDXL embedding"):
        pipe.generate("xl", **RUN)


def test_an_sdxl_embedding_reaches_both_text_encoders(tmp_path) -> None:
    from dapple.models.tiny import build_tiny_xl_pipeline

    folder = tmp_path / "xl"
    build_tiny_xl_pipeline(seed=1).save_pretrained(str(folder), safe_serialization=True)
    first, second = torch.randn(3, 64), torch.randn(3, 64)
    (tmp_path / "embeddings").mkdir()
    save_file({"clip_l": first, "clip_g": second}, str(tmp_path / "embeddings" / "shine.safetensors"))
    pipe = dapple.load(folder, device="cpu", embedding_dirs=[tmp_path / "embeddings"])
    plain = pipe.generate("a circle", **RUN).pixels
    assert not torch.equal(pipe.generate("a shine circle", **RUN).pixels, plain)
    tokens = ["<ti-shine-0>", "<ti-shine-1>", "<ti-shine-2>"]
    for tokenizer, encoder, vectors in ((pipe.components.tokenizer, pipe.components.text_encoder, first),
                                        (pipe.components.tokenizer_2, pipe.components.text_encoder_2, second)):
        assert torch.equal(encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(tokens)], vectors)
    assert torch.equal(pipe.generate("a circle", **RUN).pixels, plain)
