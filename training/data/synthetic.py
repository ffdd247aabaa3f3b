"""Deterministic synthetic raw samples (moving coloured shapes) for tests and smoke runs."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .preprocess import RawSample

_COLOURS = [(220, 60, 60), (60, 180, 90), (70, 90, 220), (230, 200, 60), (180, 80, 200)]
_MOTIONS = ["turns slowly to the left", "walks towards the camera", "raises one arm and waves", "steps to the side"]


def synthetic_samples(count: int, height: int, width: int, pixel_frames: int = 9, seed: int = 0) -> list[RawSample]:
    """`count` samples: a 'person' (ellipse) wearing a coloured 'garment' (rectangle) that moves
    across `pixel_frames` frames; the reference wears another colour, as in the paper's data."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        garment_colour = _COLOURS[i % len(_COLOURS)]
        other_colour = _COLOURS[(i + 2) % len(_COLOURS)]
        x0, dx = rng.integers(width // 4, width // 2), int(rng.integers(-3, 4))
        frames = np.stack([_person(height, width, x0 + dx * t, garment_colour) for t in range(pixel_frames)])
        reference = Image.fromarray(_person(height, width, x0, other_colour))
        garment = Image.new("RGB", (width // 3, height // 2), garment_colour)
        out.append(
            RawSample(
                id=f"synthetic-{seed}-{i:04d}",
                reference=reference,
                garment=garment,
                video=frames,
                static_caption=f"A person in a plain room wearing a {garment_colour} top.",
                dynamic_caption=f"The person {_MOTIONS[i % len(_MOTIONS)]}.",
            )
        )
    return out


def _person(height: int, width: int, cx: int, colour: tuple[int, int, int]) -> np.ndarray:
    img = Image.new("RGB", (width, height), (235, 230, 220))
    d = ImageDraw.Draw(img)
    d.ellipse([cx - width // 10, height // 10, cx + width // 10, height // 3], fill=(200, 160, 130))  # head
    d.rectangle([cx - width // 6, height // 3, cx + width // 6, int(height * 0.75)], fill=colour)  # garment
    d.rectangle([cx - width // 8, int(height * 0.75), cx + width // 8, height - 2], fill=(40, 40, 60))  # legs
    return np.asarray(img, dtype=np.uint8)


def make_synthetic_dataset(
    out_dir,
    count: int = 2,
    pixel_frames: int = 21,
    preset: str = "tiny",
    samples_per_shard: int = 2,
    seed: int = 0,
    weights_seed: int = 0,
):
    """Preprocess `count` synthetic samples with random `preset` encoders into `out_dir` (float32)."""
    from shared.models.checkpoint import build_random
    from shared.models.presets import get_preset

    from .preprocess import preprocess

    p = get_preset(preset)
    components = build_random(p, seed=weights_seed, parts=frozenset({"vae", "text_encoder"}))
    samples = synthetic_samples(count, p.streaming.height, p.streaming.width, pixel_frames, seed)
    return preprocess(samples, components, out_dir, samples_per_shard=samples_per_shard, dtype="float32")
