"""Speed presets: "quality" is exact (no step reuse, no token merging), "fast" turns on the preset's DeepCache
interval and token merging ratio for the fields a request leaves unset; fields set explicitly win."""

from __future__ import annotations

import numpy as np
import pytest

from dapple.errors import InvalidRequestError
from dapple.request import SPEED_PRESETS, make_request


def test_the_fast_preset_fills_only_the_fields_left_unset() -> None:
    assert make_request(prompt="x").speed_settings() == {  # no preset named: the default given, quality
        "deep_cache_interval": 1, "token_merging_ratio": 0.0, "token_merging_ratio_hr": 0.0}
    fast = make_request(prompt="x", speed="fast").speed_settings()
    assert fast["deep_cache_interval"] == SPEED_PRESETS["fast"]["deep_cache_interval"] > 1
    assert fast["token_merging_ratio"] == SPEED_PRESETS["fast"]["token_merging_ratio"] > 0
    explicit = make_request(prompt="x", speed="FAST", deep_cache_interval=1).speed_settings()
    assert explicit["deep_cache_interval"] == 1  # set by the request: wins over the preset
    assert explicit["token_merging_ratio"] == SPEED_PRESETS["fast"]["token_merging_ratio"]
    with pytest.raises(InvalidRequestError, match="speed must be one of 'quality', 'fast'"):
        make_request(prompt="x", speed="turbo")


def test_fast_is_the_same_image_as_its_fields_and_quality_is_the_plain_loop(pipe) -> None:
    settings = dict(steps=4, seed=5, width=64, height=64)
    plain = np.asarray(pipe.generate("a red circle", **settings).images[0])
    quality = np.asarray(pipe.generate("a red circle", speed="quality", **settings).images[0])
    fast = pipe.generate("a red circle", speed="fast", **settings)
    by_fields = pipe.generate("a red circle", **SPEED_PRESETS["fast"], **settings)
    assert np.array_equal(plain, quality)
    assert np.array_equal(np.asarray(fast.images[0]), np.asarray(by_fields.images[0]))
    assert not np.array_equal(plain, np.asarray(fast.images[0]))
    assert "DeepCache interval: 2" in fast.infotexts[0] and "Token merging ratio: 0.5" in fast.infotexts[0]


def test_sd_sized_models_on_the_cpu_default_to_fast_and_small_ones_to_quality(pipe, monkeypatch) -> None:
    from dapple.engine import pipeline as pipeline_module

    assert pipeline_module.default_speed(pipe.components) == "quality"  # the tiny model: small
    settings = dict(steps=4, seed=5, width=64, height=64)
    fast = np.asarray(pipe.generate("a red circle", speed="fast", **settings).images[0])
    quality = np.asarray(pipe.generate("a red circle", speed="quality", **settings).images[0])
    monkeypatch.setattr(pipeline_module, "BF16_MIN_PARAMETERS", 0)  # as if the tiny model were SD-sized
    assert pipeline_module.default_speed(pipe.components) == "fast"
    assert np.array_equal(np.asarray(pipe.generate("a red circle", **settings).images[0]), fast)
    assert np.array_equal(np.asarray(pipe.generate("a red circle", speed="quality", **settings).images[0]), quality)
