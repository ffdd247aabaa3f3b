"""Preprocessing: encode raw samples once (VAE latents + umT5 captions) into safetensors shards.

Raw samples are listed in a JSONL manifest, one object per line:

    {"id": "clip-001", "reference": "ref.png", "garment": "garment.png", "video": "clip.mp4",
     "static_caption": "...", "dynamic_caption": "..."}

Relative paths are resolved against the manifest's folder. Videos are resized/cropped like the
reference image (aspect ratio kept, centre crop), the garment is centre-padded, and the clip is cut
to the longest 1 + 4k pixel frames not above `max_pixel_frames` (81 in the paper). The job writes
locally and can then upload the whole folder to an object store (`upload_dataset`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from shared.media.image_tensors import to_tensor
from shared.media.images import (
    load_image,
    prepare_garment,
    prepare_reference,
)
from shared.media.video import read_frames
from shared.models.checkpoint import Components
from shared.storage.base import ObjectStore

from .format import (
    INDEX_FILE,
    NULL_TEXT_FILE,
    DatasetIndex,
    SampleRecord,
    ShardRecord,
    shard_name,
    tensor_key,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RawSample:
    """One training example before encoding. Images are PIL RGB; video is uint8 [T, H, W, 3]."""

    id: str
    reference: Image.Image
    garment: Image.Image
    video: np.ndarray
    static_caption: str
    dynamic_caption: str

    @property
    def full_caption(self) -> str:
        return f"{self.static_caption.strip()} {self.dynamic_caption.strip()}".strip()


def read_manifest(path: str | Path) -> Iterator[RawSample]:
    """Raw samples from a JSONL manifest (see module docstring); decodes images and videos."""
    manifest = Path(path)
    base = manifest.parent
    for line_no, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            yield RawSample(
                id=str(row["id"]),
                reference=load_image(base / row["reference"]),
                garment=load_image(base / row["garment"]),
                video=read_frames(base / row["video"]),
                static_caption=str(row.get("static_caption", "")),
                dynamic_caption=str(row["dynamic_caption"]),
            )
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{manifest}:{line_no}: bad manifest row ({e})") from None


def usable_pixel_frames(available: int, max_pixel_frames: int, temporal_factor: int = 4) -> int:
    """Longest 1 + 4k pixel-frame count <= min(available, max_pixel_frames)."""
    n = min(available, max_pixel_frames)
    if n < 1:
        raise ValueError("a video needs at least one frame")
    return 1 + (n - 1) // temporal_factor * temporal_factor


def _video_pixels(frames: np.ndarray, height: int, width: int, count: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [1, 3, count, height, width] in [-1, 1] (resize + centre crop)."""
    out = [to_tensor(prepare_reference(Image.fromarray(f), height, width)) for f in frames[:count]]  # [3, H, W] each
    return torch.stack(out, dim=1)[None]


def _trim_text(text: torch.Tensor) -> torch.Tensor:
    """[L, D] encoder output, zero past the prompt -> [real_len, D] (at least one row)."""
    nonzero = text.abs().amax(dim=-1) > 0  # [L]
    length = int(nonzero.nonzero().max()) + 1 if nonzero.any() else 1
    return text[:length]


class ShardWriter:
    """Writes samples into shards of `samples_per_shard` and the index when closed."""

    def __init__(self, out_dir: str | Path, index_fields: dict, samples_per_shard: int = 64):
        self.root = Path(out_dir)
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        self.index_fields = index_fields
        self.samples_per_shard = samples_per_shard
        self._tensors: dict[str, torch.Tensor] = {}
        self._records: list[SampleRecord] = []
        self._shards: list[ShardRecord] = []

    def add(self, record: SampleRecord, tensors: dict[str, torch.Tensor]) -> None:
        slot = len(self._records)
        for field, value in tensors.items():
            self._tensors[tensor_key(slot, field)] = value.detach().cpu().contiguous()
        self._records.append(record)
        if len(self._records) == self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._records:
            return
        name = shard_name(len(self._shards))
        path = self.root / name
        save_file(self._tensors, str(path), metadata={"samples": str(len(self._records))})
        data = path.read_bytes()
        self._shards.append(
            ShardRecord(
                file=name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), samples=tuple(self._records)
            )
        )
        self._tensors, self._records = {}, []

    def close(self) -> DatasetIndex:
        self._flush()
        index = DatasetIndex(shards=tuple(self._shards), **self.index_fields)
        (self.root / INDEX_FILE).write_text(index.model_dump_json(indent=2) + "\n")
        return index


@torch.no_grad()
def preprocess(
    samples: Iterable[RawSample],
    components: Components,
    out_dir: str | Path,
    *,
    max_pixel_frames: int = 81,
    samples_per_shard: int = 64,
    dtype: str = "bfloat16",
) -> DatasetIndex:
    """Encode every sample with the components' VAE and text encoder into `out_dir`."""
    vae, text_encoder, preset = components.vae, components.text_encoder, components.preset
    if vae is None or text_encoder is None:
        raise ValueError("preprocessing needs the VAE and the text encoder")
    store_dtype = DTYPES[dtype]
    st = preset.streaming
    height, width = st.height, st.width
    fields = {
        "preset": preset.name,
        "encoder_id": components.checkpoint_id,
        "height": height,
        "width": width,
        "latent_channels": vae.z_dim,
        "latent_hw": preset.latent_hw(),
        "text_dim": text_encoder.dim,
        "text_max_length": text_encoder.max_length,
        "dtype": dtype,
    }
    writer = ShardWriter(out_dir, fields, samples_per_shard)
    device, vdtype = vae.device, vae.dtype
    for sample in samples:
        count = usable_pixel_frames(len(sample.video), max_pixel_frames, vae.temporal_factor)
        video = vae.encode_video(_video_pixels(sample.video, height, width, count).to(device, vdtype))[0]
        ref = vae.encode_image(to_tensor(prepare_reference(sample.reference, height, width))[None].to(device, vdtype))[
            0
        ]
        gar = vae.encode_image(to_tensor(prepare_garment(sample.garment, height, width))[None].to(device, vdtype))[0]
        texts = text_encoder.encode([sample.full_caption, sample.dynamic_caption])  # [2, L, D]
        tensors = {
            "video": video,  # [C, f, h, w]
            "reference": ref,  # [C, 1, h, w]
            "garment": gar,
            "text_full": _trim_text(texts[0]),
            "text_dynamic": _trim_text(texts[1]),
        }
        record = SampleRecord(
            id=sample.id,
            latent_frames=video.shape[1],
            static_caption=sample.static_caption,
            dynamic_caption=sample.dynamic_caption,
        )
        writer.add(record, {k: v.to(store_dtype) for k, v in tensors.items()})
    null_text = text_encoder.encode([""])[0]  # [L, D], for classifier-free guidance
    save_file({"text": _trim_text(null_text).to(store_dtype).cpu().contiguous()}, str(Path(out_dir) / NULL_TEXT_FILE))
    return writer.close()


def upload_dataset(local_dir: str | Path, store: ObjectStore, prefix: str) -> int:
    """Copy a preprocessed folder to `store` under `prefix` (shards first, index last). Returns objects."""
    root = Path(local_dir)
    index = DatasetIndex.model_validate_json((root / INDEX_FILE).read_text())
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    files = [s.file for s in index.shards] + [NULL_TEXT_FILE, INDEX_FILE]
    for name in files:  # the index goes last: readers never see an index whose shards are missing
        store.put_file(prefix + name, root / name)
    return len(files)
