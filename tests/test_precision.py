"""Precision: the dtype chosen per device and model size, native bf16 read from the CPU's flags, weights loaded
straight into the target dtype (the same values as the library's own conversion), fp16 VAEs kept from
overflowing, and float32 latents around a reduced-precision UNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

import dapple
from dapple.models import precision
from dapple.models.devices import resolve_dtype

CPU = torch.device("cpu")
SD15_UNET = 859_520_964


def _cpuinfo(tmp_path, flags: str, key: str = "flags"):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: GenuineIntel\n{key}\t\t: {flags}\n\nprocessor\t: 1\n")
    return path


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(precision.platform, "system", lambda: "Linux")
    assert precision.cpu_has_native_bf16(_cpuinfo(tmp_path, "fpu sse avx2 avx512f avx512_bf16 avx512_vnni"))
    assert precision.cpu_has_native_bf16(_cpuinfo(tmp_path, "fpu avx512f amx_bf16 amx_tile"))
    assert precision.cpu_has_native_bf16(_cpuinfo(tmp_path, "fp asimd bf16 i8mm", key="Features"))  # Arm
    assert not precision.cpu_has_native_bf16(_cpuinfo(tmp_path, "fpu sse avx2 avx512f avx512bw"))  # emulated only
    assert not precision.cpu_has_native_bf16(tmp_path / "missing")
    monkeypatch.setattr(precision.platform, "system", lambda: "Darwin")
    assert not precision.cpu_has_native_bf16(_cpuinfo(tmp_path, "avx512_bf16"))


@pytest.mark.parametrize("native", [True, False])
def test_the_default_dtype_per_device_and_model_size(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    large = torch.bfloat16 if native else torch.float32
    assert resolve_dtype(None, CPU, SD15_UNET) == large
    assert resolve_dtype(None, CPU, precision.BF16_MIN_PARAMETERS - 1) == torch.float32  # the built-in model's size
    assert resolve_dtype(None, CPU) == torch.float32  # size unknown
    assert resolve_dtype(None, torch.device("cuda"), SD15_UNET) == torch.float16
    assert resolve_dtype("fp32", CPU, SD15_UNET) == torch.float32  # asked for: always what was asked
    assert resolve_dtype("bf16", CPU, 10) == torch.bfloat16


def test_an_fp16_vae_that_overflows_is_kept_out_of_fp16(monkeypatch) -> None:
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert precision.vae_dtype(torch.float16, cuda, force_upcast=True) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert precision.vae_dtype(torch.float16, cuda, force_upcast=True) == torch.float32
    assert precision.vae_dtype(torch.float16, cuda, force_upcast=False) == torch.float16  # an fp16-fixed VAE
    assert precision.vae_dtype(torch.bfloat16, CPU, force_upcast=True) == torch.bfloat16  # bf16 has fp32's range


def test_parameter_count_and_stored_dtype_come_from_the_headers(tiny_model_dir) -> None:
    files = precision.safetensors_files(tiny_model_dir / "unet")
    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir / "unet"))
    assert precision.parameter_count(files) == unet.num_parameters()
    assert precision.stored_dtype(files) == torch.float32
    assert precision.stored_dtype([]) is None


@pytest.mark.parametrize("part, cls", [("unet", UNet2DConditionModel), ("vae", AutoencoderKL),
                                       ("text_encoder", CLIPTextModel)])
def test_streamed_weights_equal_the_librarys_own_bf16_load(tiny_model_dir, part: str, cls: type) -> None:
    """The oracle is the library's from_pretrained(torch_dtype=bf16): the same values, in memory of their own."""
    folder = tiny_model_dir / part
    kwargs = {"dtype": torch.bfloat16} if cls is CLIPTextModel else {"torch_dtype": torch.bfloat16}
    expected = cls.from_pretrained(str(folder), **kwargs).state_dict()
    model = precision.load_weights_into(cls.from_pretrained(str(folder)), precision.safetensors_files(folder),
                                        torch.bfloat16, channels_last=True)
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in state.items():
        assert tensor.dtype == expected[name].dtype, name
        assert torch.equal(tensor, expected[name]), name
        if tensor.dim() == 4:
            assert tensor.is_contiguous(memory_format=torch.channels_last), name


def test_a_bf16_pipeline_keeps_float32_latents_and_stays_close_to_fp32(tiny_model_dir) -> None:
    fp32 = dapple.load(tiny_model_dir, dtype="fp32")
    bf16 = dapple.load(tiny_model_dir, dtype="bf16")
    assert bf16.components.unet.dtype == torch.bfloat16 and bf16.components.vae.dtype == torch.bfloat16
    final: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda step: final.__setitem__(name, step.latents)

    settings = dict(steps=4, seed=3, width=64, height=64)
    a = np.asarray(fp32.generate("a red circle", callback=keep("fp32"), **settings).images[0], dtype=float)
    b = np.asarray(bf16.generate("a red circle", callback=keep("bf16"), **settings).images[0], dtype=float)
    assert final["fp32"].dtype == final["bf16"].dtype == torch.float32
    assert not torch.equal(final["fp32"], final["bf16"])
    assert (final["fp32"] - final["bf16"]).abs().max() / final["fp32"].abs().max() < 0.1
    assert np.abs(a - b).mean() < 8  # of 255
