"""RGB images <-> float tensors in [-1, 1], the value range of the VAE (torch lives here, not in
`shared.media.images`, so image decoding stays importable without torch)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from shared.media.images import ImageError


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor [3, H, W] in [-1, 1]."""
    if img.mode != "RGB":
        raise ImageError(f"expected an RGB image, got mode {img.mode}")
    hwc = torch.from_numpy(np.array(img, dtype=np.uint8))  # [H, W, 3]
    return hwc.permute(2, 0, 1).float().div(127.5).sub(1.0)  # [3, H, W]


def from_tensor(t: torch.Tensor) -> Image.Image:
    """Tensor [3, H, W] in [-1, 1] -> RGB image (values outside [-1, 1] are clipped)."""
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected [3, H, W], got {tuple(t.shape)}")
    hwc = ((t.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0)  # [H, W, 3]
    return Image.fromarray(hwc.cpu().numpy())  # uint8 [H, W, 3] -> mode RGB
