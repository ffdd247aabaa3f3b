"""Samples shaped like the paper's data (section 4.1): a clip of person P wearing top G, the
reference image of P wearing a different top in the clip's first-frame pose, the garment image of
G laid flat on white, and a static + a dynamic caption. `split` is "train" or "test" (held-out
identities and top colours, see `render.HOLDOUT_COLOURS` and `render.identity_key`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .render import Scene, reference_top, render_clip, render_frame, render_garment, sample_scene, static_caption

SPLIT_SEEDS = {"train": 0, "test": 1_000_003}


@dataclass
class ToySample:
    id: str
    scene: Scene
    reference_scene: Scene
    video: np.ndarray  # uint8 [T, H, W, 3]
    reference: np.ndarray  # uint8 [H, W, 3]
    garment: np.ndarray  # uint8 [S, S, 3] (the pipeline centre-pads it to the video size)
    static_caption: str
    dynamic_caption: str


def make_sample(index: int, split: str, frames: int, height: int, width: int, fps: int = 24) -> ToySample:
    """Sample `index` of a split: deterministic in (split, index)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, not {split!r}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    scene = sample_scene(rng, split)
    ref_scene = scene.with_top(reference_top(scene, rng, split))
    return ToySample(
        id=f"toy-{split}-{index:06d}",
        scene=scene,
        reference_scene=ref_scene,
        video=render_clip(scene, frames, height, width, fps),
        reference=render_frame(ref_scene, 0, height, width, fps),
        garment=render_garment(scene.top),
        static_caption=static_caption(scene),
        dynamic_caption=scene.motion.caption,
    )
