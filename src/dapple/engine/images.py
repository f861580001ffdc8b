"""Input images for the image modes: opening them safely, A1111's resize modes, masks, and VAE tensors.

- open_image: PIL image, numpy array, path, raw bytes or base64 (data URL) -> RGB/L PIL image, refusing anything
  over the pixel limit from its header, before the pixels are decoded (decompression bombs).
- resize_to: A1111's "Just resize", "Crop and resize" and "Resize and fill" (modules/images.py resize_image).
- prepare_mask: any PIL mode or an alpha channel -> "L" mask, white = repaint; invert; size check.
- to_vae_tensor / mask_tensor: what diffusers' VaeImageProcessor makes of an image and of a mask.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from dapple.errors import DappleWarning, InvalidRequestError

RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")
DEFAULT_MAX_PIXELS = 4096 * 4096


class MaskResizedWarning(DappleWarning):
    """The mask's size differed from the image's; it was resized to fit."""


def _decode_base64(text: str, what: str = "image") -> bytes:
    payload = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidRequestError(f"{what} is not valid base64 image data ({error})") from None


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    if width * height > max_pixels:
        raise InvalidRequestError(
            f"{what} is {width}x{height} = {width * height} pixels; allowed: at most {max_pixels} pixels"
        )


def open_image(source: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "image") -> Image.Image:
    """Open `source` as a PIL image, checking its size against max_pixels before decoding the pixels.

    Accepts a PIL image, a numpy array (H, W) or (H, W, 3|4) of uint8 or floats in [0, 1], a path, bytes, or a
    base64 string (with or without a data: URL prefix)."""
    if isinstance(source, Image.Image):
        _check_pixels(*source.size, max_pixels, what)
        return source
    if isinstance(source, np.ndarray):
        if source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (1, 3, 4)):
            raise InvalidRequestError(f"{what} array has shape {source.shape}; allowed: (H, W) or (H, W, 1|3|4)")
        _check_pixels(source.shape[1], source.shape[0], max_pixels, what)
        array = source if source.dtype == np.uint8 else (np.clip(source, 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(array.squeeze(2) if array.ndim == 3 and array.shape[2] == 1 else array)
    if isinstance(source, (bytes, bytearray)):
        stream: Any = io.BytesIO(bytes(source))
    elif isinstance(source, str) and (source.startswith("data:") or len(source) > 1024):
        stream = io.BytesIO(_decode_base64(source, what))
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InvalidRequestError(f"{what} file {str(path)!r} does not exist")
        stream = path
    else:
        raise InvalidRequestError(
            f"{what} has type {type(source).__name__}; allowed: PIL image, numpy array, path, bytes or base64 text"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream)  # reads the header only
            _check_pixels(*image.size, max_pixels, what)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidRequestError(f"{what} refused: {error}") from None
    except (OSError, ValueError, SyntaxError) as error:  # UnidentifiedImageError is an OSError; a text chunk
        raise InvalidRequestError(f"{what} could not be read as an image ({error})") from None  # bomb, ValueError
    return image


def check_encoded_image(text: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "image") -> None:
    """For images arriving over the network: only base64 (or a data: URL) is accepted, never a path on the
    server, and the size is read from the header and checked without decoding the pixels (encoded_image_text's
    checks)."""
    encoded_image_text(text, max_pixels=max_pixels, what=what)


def encoded_image_text(text: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "image") -> dict[str, str]:
    """The text chunks (PNG tEXt/zTXt/iTXt) of a base64 image from the network, through the same checks as
    check_encoded_image. Pixels are never decoded, so only the chunks before the image data are read (where
    A1111 and Dapple write infotext); one that would inflate past Pillow's limit (PngImagePlugin.MAX_TEXT_CHUNK,
    1 MB) is refused."""
    if not isinstance(text, str) or not text:
        raise InvalidRequestError(f"{what} must be a base64-encoded image (or a data: URL)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(_decode_base64(text, what))) as image:
                _check_pixels(*image.size, max_pixels, what)
                return {key: value for key, value in image.info.items() if isinstance(value, str)}
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidRequestError(f"{what} refused: {error}") from None
    except (OSError, ValueError, SyntaxError) as error:  # ValueError: "Decompressed Data Too Large"
        raise InvalidRequestError(f"{what} is not a readable image ({error})") from None


def resize_to(image: Image.Image, width: int, height: int, mode: str = "just resize") -> Image.Image:
    """Fit an image to width x height as A1111's resize modes do.

    just resize: stretch to the size; crop and resize: scale to cover, then crop the centre; resize and fill:
    scale to fit inside, then fill the borders by stretching the image's edge rows/columns outwards."""
    if image.size == (width, height):
        return image
    if mode == "just resize":
        return image.resize((width, height), Image.LANCZOS)
    ratio, source_ratio = width / height, image.width / image.height
    if mode == "crop and resize":
        scale = max(width / image.width, height / image.height)
        scaled = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                              Image.LANCZOS)
        left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    if mode == "resize and fill":
        fit_w, fit_h = (width, max(1, round(width / source_ratio))) if source_ratio > ratio else \
            (max(1, round(height * source_ratio)), height)
        scaled = np.asarray(image.convert("RGB").resize((fit_w, fit_h), Image.LANCZOS))
        top, left = (height - fit_h) // 2, (width - fit_w) // 2
        padded = np.pad(scaled, ((top, height - fit_h - top), (left, width - fit_w - left), (0, 0)), mode="edge")
        return Image.fromarray(padded)
    raise InvalidRequestError(f"resize_mode={mode!r} is unknown; allowed: {', '.join(RESIZE_MODES)}")


def mask_from_image(mask: Image.Image) -> Image.Image:
    """Any mask image -> "L". An alpha channel with any transparency is the mask (opaque = repaint, as a stroke
    painted on a transparent canvas); otherwise the luminance is (white = repaint)."""
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha
    return mask.convert("L")


def prepare_mask(mask: Image.Image, size: tuple[int, int], *, invert: bool = False) -> Image.Image:
    """The repaint mask at `size` (white = repaint). Warns when it had to be resized; refuses an empty mask."""
    mask = mask_from_image(mask)
    if invert:
        mask = Image.eval(mask, lambda value: 255 - value)
    if mask.size != size:
        warnings.warn(
            f"mask is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}; the mask was resized",
            MaskResizedWarning, stacklevel=3,
        )
        mask = mask.resize(size, Image.NEAREST)
    if mask.getextrema()[1] < 128:
        raise InvalidRequestError(
            "nothing to inpaint: the mask is all black (white marks the area to repaint"
            + ("; invert_mask is on" if invert else "") + ")"
        )
    return mask


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """Gaussian-blurred mask for the soft edge of paste-back (A1111's mask_blur, in pixels)."""
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def to_vae_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images -> (batch, 3, H, W) float32 in [-1, 1], as VaeImageProcessor.preprocess makes them."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) * 2.0 - 1.0


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """"L" mask -> (1, 1, H, W) of 0/1, binarized at one half as diffusers' mask processor does."""
    array = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy((array >= 0.5).astype(np.float32))[None, None]


def _gaussian_blur(planes: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, H, W) float planes, zero outside the image (for normalized convolution)."""
    radius = max(1, min(int(3 * sigma), max(planes.shape[-2:])))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = planes[:, None]
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1), padding=(0, radius))
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return x[:, 0]


def fill_masked_area(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content: the masked area takes the colours around it (normalized convolution of the
    known pixels at shrinking blur radii, so far pixels get a broad average and near ones the local colour)."""
    rgb = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
    known = torch.from_numpy((np.asarray(mask.convert("L")) < 128).astype(np.float32))
    if known.sum() == 0:
        return image.convert("RGB")
    filled = torch.zeros_like(rgb)
    for sigma in (64.0, 16.0, 4.0, 1.0):  # each finer estimate overwrites where it has enough known neighbours
        weights = _gaussian_blur(known[None], sigma)[0]
        estimate = _gaussian_blur(rgb * known, sigma) / weights.clamp(min=1e-6)
        confident = weights > (1e-6 if sigma == 64.0 else 0.05)
        filled = torch.where(confident, estimate, filled)
    result = torch.where(known > 0, rgb, filled).clamp(0, 255).round().to(torch.uint8)
    return Image.fromarray(result.permute(1, 2, 0).numpy())
