"""A weight-free no-reference image quality proxy on RGB frames (uint8 [H, W, 3]).

The mean of three terms on the grey image in [0, 1]: sharpness (Laplacian variance beyond what
noise explains), cleanliness (Immerkaer's noise estimate over the flattest pixels) and RMS
contrast. It catches blur, noise and washed-out frames; it is not MUSIQ and its numbers must not
be compared with MUSIQ's. Used by the eval service's weight-free quality metric and by data
curation's default quality filter.
"""

from __future__ import annotations

import math

import numpy as np

WEIGHTFREE_MODEL = "laplacian-sharpness+immerkaer-noise+rms-contrast (weight-free proxy)"
_SHARP_HALF = 0.01
_LAPLACIAN_NOISE_GAIN = 80.0  # sum of squares of OpenCV's 3x3 Laplacian kernel [[2,0,2],[0,-8,0],[2,0,2]]
_FLAT_QUANTILE = 25.0
_NOISE_FULL = 0.05
_CONTRAST_FULL = 0.2


def _gray01(frame: np.ndarray) -> np.ndarray:
    f = frame.astype(np.float32) / 255.0
    return f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114


def noise_sigma(gray: np.ndarray) -> float:
    """Immerkaer (1996) noise standard deviation of a grey image (same units as the image),
    over the flattest `_FLAT_QUANTILE` % of the interior pixels."""
    import cv2

    h, w = gray.shape
    if h < 3 or w < 3:
        return 0.0
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
    conv = np.abs(cv2.filter2D(gray, cv2.CV_32F, kernel))[1:-1, 1:-1]
    grad = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))[1:-1, 1:-1]
    flat = grad <= np.percentile(grad, _FLAT_QUANTILE)
    return float(math.sqrt(math.pi / 2) * conv[flat].mean() / 6)


def frame_quality(frame: np.ndarray) -> dict[str, float]:
    import cv2

    g = _gray01(frame)
    sigma = noise_sigma(g)
    lap_var = float(cv2.Laplacian(g, cv2.CV_32F, ksize=3).var())
    signal = max(0.0, lap_var - _LAPLACIAN_NOISE_GAIN * sigma**2)
    sharp = signal / (signal + _SHARP_HALF)
    clean = 1.0 - min(1.0, sigma / _NOISE_FULL)
    contrast = min(1.0, float(g.std()) / _CONTRAST_FULL)
    return {"sharpness": sharp, "cleanliness": clean, "contrast": contrast, "score": (sharp + clean + contrast) / 3}
