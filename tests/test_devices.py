"""Devices and CPU threads: a device the machine lacks is refused before loading; one thread for small models
(contention on a busy machine costs them up to 9x), the cores this process may use for the rest, and the user's
--threads / threads= wins."""

from __future__ import annotations

import pytest
import torch

import dapple
from dapple.errors import ModelLoadError
from dapple.models import devices


def test_small_models_get_one_thread_and_large_ones_the_usable_cores(monkeypatch) -> None:
    monkeypatch.setattr(devices, "_torch_default_threads", 8)
    monkeypatch.setattr(devices, "available_cores", lambda: 3)
    assert devices.choose_threads(None, devices.SMALL_MODEL_PARAMETERS - 1) == 1
    assert devices.choose_threads(None, 860_000_000) == 3  # SD 1.5's UNet; capped by the usable cores
    monkeypatch.setattr(devices, "available_cores", lambda: 16)
    assert devices.choose_threads(None, 860_000_000) == 8  # torch's default (physical cores) caps it too


def test_a_requested_count_wins_and_nonsense_is_refused() -> None:
    assert devices.choose_threads(5, 10) == 5
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ModelLoadError, match="threads must be a whole number >= 1"):
            devices.choose_threads(bad, 10)


def test_a_container_quota_caps_the_cores(tmp_path) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert devices._cgroup_cpu_limit(cpu_max) == 1
    cpu_max.write_text("400000 100000\n")
    assert devices._cgroup_cpu_limit(cpu_max) == 4
    cpu_max.write_text("max 100000\n")
    assert devices._cgroup_cpu_limit(cpu_max) is None
    assert devices._cgroup_cpu_limit(tmp_path / "missing") is None
    assert devices.available_cores() >= 1


def test_load_sets_torch_threads(tiny_model_dir) -> None:
    before = torch.get_num_threads()
    try:
        dapple.load(tiny_model_dir, threads=2)
        assert torch.get_num_threads() == 2
        dapple.load(tiny_model_dir)  # the tiny test model is small: one thread
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_device_the_machine_lacks_is_refused_before_loading(monkeypatch, tiny_model_dir) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="cuda: CUDA is not available here"):
        dapple.load(tiny_model_dir, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ModelLoadError, match=r"has 1 CUDA device\(s\); allowed: cuda:0..cuda:0"):
        devices.resolve_device("cuda:3")
    with pytest.raises(ModelLoadError, match="unknown device 'gpu'"):
        devices.resolve_device("gpu")
    assert devices.resolve_device("cpu") == torch.device("cpu")
