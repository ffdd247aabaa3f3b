"""Metrics backed by large learned models, loaded only from local folders.

- temporal_smoothness_qalign (OpenS2V-Eval's motion smoothness, the paper's "Smoothness"):
  every frame gets a Q-Align video-quality score over a sliding window of `window` frames
  (centred, edge frames repeated); a frame is an artifact frame when its score differs from a
  neighbour's by more than `threshold` (both frames of such a pair count); the score is
  1 - artifact frames / frames. Scores are on 0..1 (Q-Align's 1..5 mapped by (s - 1) / 4,
  which equals OpenS2V's softmax weights [1, .75, .5, .25, 0]).
- text_alignment_gme (OpenS2V's GME score): `num_frames` uniformly sampled frames embedded
  with GME, the prompt embedded with the retrieval instruction, mean of the dot products of
  the normalized embeddings.

Both models ship their modelling code with the weights (Hugging Face `trust_remote_code`):
the loaders execute that code from the configured local folder only (`local_files_only`),
never from a hub. Scorers are small protocols so the aggregation is tested without the models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from .base import MetricResult, SampleVideo, sample_indices


class WindowScorer(Protocol):
    name: str

    def score_windows(self, windows: list[list[Image.Image]]) -> list[float]:
        """Video-quality score in [0, 1] of each window of frames."""


class TextImageEmbedder(Protocol):
    name: str

    def embed_text(self, text: str, instruction: str) -> np.ndarray:
        """[D] normalized."""

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """[N, D] normalized."""


def sliding_windows(num_frames: int, window: int) -> list[list[int]]:
    """Frame indices of the window centred on each frame, OpenS2V style (edges repeated)."""
    left = (window - 1) // 2
    right = window - 1 - left
    out = []
    for t in range(num_frames):
        if t < left:
            out.append([0] * window)
            continue
        idx = list(range(max(0, t - left), min(num_frames, t + right + 1)))
        while len(idx) < window:
            idx.append(idx[-1])
        out.append(idx)
    return out


def artifact_frames(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Frames whose score jumps by more than `threshold` from the previous or the next frame."""
    jumps = np.where(np.abs(np.diff(scores)) > threshold)[0]
    return np.unique(np.concatenate([jumps, jumps + 1]))


def qalign_smoothness(scorer: WindowScorer, video: SampleVideo, window: int, threshold: float) -> MetricResult:
    frames = [Image.fromarray(f) for f in video.frames]
    windows = [[frames[i] for i in w] for w in sliding_windows(len(frames), window)]
    scores = np.asarray(scorer.score_windows(windows), dtype=np.float64)
    if scores.shape != (len(frames),):
        raise ValueError(f"Q-Align scorer returned {scores.shape} scores for {len(frames)} windows")
    bad = artifact_frames(scores, threshold)
    return MetricResult.ok(
        "temporal_smoothness_qalign",
        1.0 - len(bad) / len(scores),
        scorer.name,
        artifact_frames=len(bad),
        mean_quality=float(scores.mean()),
    )


def gme_alignment(embedder: TextImageEmbedder, video: SampleVideo, num_frames: int, instruction: str) -> MetricResult:
    idx = sample_indices(video.frames.shape[0], num_frames)
    text = np.asarray(embedder.embed_text(video.prompt, instruction), dtype=np.float64).reshape(-1)
    images = np.asarray(embedder.embed_images([Image.fromarray(video.frames[i]) for i in idx]), dtype=np.float64)
    sims = images @ text  # [N]
    return MetricResult.ok("text_alignment_gme", float(sims.mean()), embedder.name, frames=len(idx))


def _local_folder(path: Path, what: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise RuntimeError(f"{what} folder {folder} has no config.json (give a local model folder)")
    return folder


class QAlignScorer:
    """q-future/one-align through its own `score(..., input_="video")` method (1..5 -> 0..1)."""

    def __init__(self, path: Path, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM

        folder = _local_folder(path, "Q-Align")
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                str(folder),
                trust_remote_code=True,
                local_files_only=True,
                torch_dtype=dtype,
                attn_implementation="eager",
            )
            .to(device)
            .eval()
        )
        self.name = f"q-align ({folder.name})"

    def score_windows(self, windows: list[list[Image.Image]]) -> list[float]:
        import torch

        with torch.inference_mode():
            raw = self.model.score(windows, task_="quality", input_="video")
        return [(float(s) - 1.0) / 4.0 for s in torch.as_tensor(raw).reshape(-1).tolist()]


class GmeEmbedder:
    """Alibaba-NLP/gme-Qwen2-VL-* through its own get_text_embeddings / get_image_embeddings."""

    def __init__(self, path: Path, device: str = "cpu"):
        import torch
        from transformers import AutoModel

        folder = _local_folder(path, "GME")
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.model = (
            AutoModel.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True, torch_dtype=dtype)
            .to(device)
            .eval()
        )
        self.name = f"gme ({folder.name})"

    def embed_text(self, text: str, instruction: str) -> np.ndarray:
        e = self.model.get_text_embeddings(texts=[text], instruction=instruction)
        return _normalized(e)[0]

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        return _normalized(self.model.get_image_embeddings(images=images, is_query=False))


def _normalized(e) -> np.ndarray:
    arr = np.asarray(e.float().cpu().numpy() if hasattr(e, "float") else e, dtype=np.float64)
    return arr / np.maximum(np.linalg.norm(arr, axis=-1, keepdims=True), 1e-12)
