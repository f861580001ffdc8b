"""Control preprocessors: turn a picture into the control map a ControlNet or T2I-Adapter was trained on.

Only methods that need no downloaded weights live here (OpenCV and NumPy); maps that need a model (depth, normal,
pose, lineart) are given by the user as images, with module "none".
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

CANNY_LOW = 100  # sd-webui-controlnet's canny defaults (threshold_a, threshold_b)
CANNY_HIGH = 200


def canny(image: Image.Image, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> Image.Image:
    """Canny edges (Canny, 1986) of the RGB image, white on black, as an RGB map: OpenCV's cv2.Canny on the
    colour image, as sd-webui-controlnet's canny module (edges between colours of equal brightness count too)."""
    pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    edges = cv2.Canny(pixels, float(low), float(high))
    return Image.fromarray(np.stack([edges] * 3, axis=-1))
