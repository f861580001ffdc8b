"""Multi-resolution training noise: white noise when off, unit variance, more power at coarse scales."""

import torch
import torch.nn.functional as F

from dapple.train.noise import multires_noise

SHAPE = (32, 4, 16, 16)


def test_discount_zero_is_the_plain_gaussian_draw() -> None:
    plain = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    assert torch.equal(multires_noise(SHAPE, torch.Generator().manual_seed(3), 0.0), plain)


def test_each_image_has_unit_std_and_the_draw_is_seeded() -> None:
    noise = multires_noise(SHAPE, torch.Generator().manual_seed(0), 0.8)
    assert noise.shape == SHAPE
    assert torch.allclose(noise.std(dim=(1, 2, 3)), torch.ones(SHAPE[0]), atol=1e-5)
    assert torch.equal(noise, multires_noise(SHAPE, torch.Generator().manual_seed(0), 0.8))


def test_coarse_scales_carry_more_noise_than_white_noise() -> None:
    """What drowns the schedule's low-frequency signal leak: 8x8-block means vary ~4x more than white noise's."""
    white = F.avg_pool2d(multires_noise(SHAPE, torch.Generator().manual_seed(1), 0.0), 8).std()
    pyramid = F.avg_pool2d(multires_noise(SHAPE, torch.Generator().manual_seed(1), 0.8), 8).std()
    assert pyramid > 3 * white
