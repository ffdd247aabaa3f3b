"""Visual quality of the frames.

- visual_quality_musiq: MUSIQ (the paper's VQ score, per frame, averaged) through pyiqa with a
  checkpoint file given locally (`musiq_weights`; e.g. pyiqa's musiq_koniq checkpoint). pyiqa
  scores on 0..100; the value is divided by 100 to match the paper's table. Without pyiqa or
  without the file: "unavailable" (pyiqa would otherwise download weights; it is never asked to).
- visual_quality_weightfree: a transparent no-reference proxy that needs no weights, the mean
  over sampled frames of three terms on the grey image in [0, 1]:
    sharpness   = s / (s + 0.01), s = variance of the 3x3 Laplacian minus the part noise
                  explains (80 sigma^2 for OpenCV's 3x3 Laplacian);
    cleanliness = 1 - min(1, sigma / 0.05), sigma = Immerkaer's fast noise estimate taken over
                  the flattest quarter of the pixels (lowest Sobel gradient), so texture is
                  not mistaken for noise;
    contrast    = min(1, std / 0.2), the RMS contrast.
  It catches blur, noise and washed-out frames; it is *not* MUSIQ and its numbers must not be
  compared with MUSIQ's or the paper's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.media.quality import WEIGHTFREE_MODEL, frame_quality

from .base import MetricResult, SampleVideo, sample_indices


def weightfree_quality(video: SampleVideo, num_frames: int) -> MetricResult:
    idx = sample_indices(video.frames.shape[0], num_frames)
    per = [frame_quality(video.frames[i]) for i in idx]
    mean = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
    score = mean.pop("score")
    return MetricResult.ok("visual_quality_weightfree", score, WEIGHTFREE_MODEL, **mean)


class MusiqScorer:
    """pyiqa's MUSIQ from a local checkpoint; raises RuntimeError with the reason if unusable."""

    name = "musiq (pyiqa)"

    def __init__(self, weights: Path, device: str = "cpu"):
        path = Path(weights)
        if not path.is_file():
            raise RuntimeError(f"MUSIQ checkpoint {path} not found")
        try:
            import pyiqa
        except ImportError:
            raise RuntimeError("pyiqa is not installed (pip install pyiqa)") from None
        # pretrained_model_path makes pyiqa load this file instead of downloading its default.
        self.metric = pyiqa.create_metric("musiq", device=device, as_loss=False, pretrained_model_path=str(path))
        self.device = device
        self.name = f"musiq (pyiqa, {path.name})"

    def score_frames(self, frames: np.ndarray) -> list[float]:
        import torch

        out = []
        with torch.no_grad():
            for f in frames:
                x = torch.from_numpy(f).permute(2, 0, 1)[None].float().div(255).to(self.device)  # [1, 3, H, W]
                out.append(float(self.metric(x).reshape(-1)[0]))
        return out


def musiq_quality(scorer: MusiqScorer, video: SampleVideo, num_frames: int) -> MetricResult:
    idx = sample_indices(video.frames.shape[0], num_frames)
    scores = scorer.score_frames(video.frames[idx])
    return MetricResult.ok(
        "visual_quality_musiq", float(np.mean(scores)) / 100.0, scorer.name, musiq_raw_mean=float(np.mean(scores))
    )
