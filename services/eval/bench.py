"""Benchmark manifests: one JSON object per line, one sample per object.

    {"id": "hgc-0001", "reference": "images/ref-0001.jpg", "garment": "images/g-0001.jpg",
     "prompt": "A woman walks toward the camera ...",
     "frames": 165,                                            # optional: long-video run
     "switches": [{"chunk": 4, "garment": "images/g-0002.jpg"}],  # optional: interactive run
     "seed": 7, "tags": ["long"]}                               # optional

Image references: a path relative to the manifest's folder, an absolute path, or
"object:<key>" for an object in the object store. A manifest itself may live in the object
store ("object:<key>"); its relative references then resolve against the key's folder.
Blank lines and lines starting with "#" are ignored.

`frames` is a length in pixel frames; it becomes whole chunks (9 frames for the first chunk,
12 after, for the standard chunk of 3 latent frames) and the video is cut to `frames`.
A switch at chunk K makes chunk K the first one wearing the new garment (1 <= K < chunks).
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.media.images import ImageError, load_image
from shared.storage import ObjectStore

OBJECT_PREFIX = "object:"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class BenchError(ValueError):
    """A manifest or one of its images is unusable (message names the line / sample)."""


class Switch(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    chunk: int = Field(ge=1)  # first chunk wearing `garment`
    garment: str


class Sample(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    reference: str
    garment: str
    prompt: str
    frames: int | None = Field(default=None, ge=1)  # pixel frames; None: the runner's default
    switches: tuple[Switch, ...] = ()
    seed: int | None = None
    tags: tuple[str, ...] = ()

    @field_validator("id")
    @classmethod
    def _check_id(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError(f"sample id must match {_ID.pattern} (it names files), got {v!r}")
        return v

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt is empty")
        return v

    @property
    def interactive(self) -> bool:
        return bool(self.switches)


@dataclass(frozen=True)
class ChunkPlan:
    """Pixel frames of the first and of every later chunk (3 latent frames: 9 and 12)."""

    first: int = 9
    later: int = 12

    def chunks_for(self, frames: int) -> int:
        """Fewest chunks that give at least `frames` pixel frames."""
        return 1 if frames <= self.first else 1 + math.ceil((frames - self.first) / self.later)

    def first_frame_of(self, chunk: int) -> int:
        """Index of the first pixel frame of `chunk`."""
        return 0 if chunk == 0 else self.first + (chunk - 1) * self.later

    @classmethod
    def from_latent(cls, chunk_frames: int, temporal_factor: int = 4) -> ChunkPlan:
        return cls(first=1 + temporal_factor * (chunk_frames - 1), later=temporal_factor * chunk_frames)


@dataclass(frozen=True)
class Benchmark:
    name: str
    samples: tuple[Sample, ...]
    sha256: str  # of the manifest bytes: identifies the exact benchmark version in reports
    base: str  # folder (local path) or key prefix ("object:<prefix>") relative refs resolve against
    store: ObjectStore | None = None

    def resolve(self, ref: str) -> str:
        """A reference as a local path or "object:<key>"."""
        if ref.startswith(OBJECT_PREFIX):
            return ref
        if self.base.startswith(OBJECT_PREFIX):
            if Path(ref).is_absolute():
                return ref
            prefix = self.base[len(OBJECT_PREFIX) :]
            return OBJECT_PREFIX + posixpath.normpath(posixpath.join(prefix, ref)) if prefix else OBJECT_PREFIX + ref
        p = Path(ref)
        return str(p if p.is_absolute() else Path(self.base) / p)

    def image_bytes(self, ref: str) -> bytes:
        where = self.resolve(ref)
        if where.startswith(OBJECT_PREFIX):
            if self.store is None:
                raise BenchError(f"image {ref!r} is an object key but no object store is configured")
            return self.store.get_bytes(where[len(OBJECT_PREFIX) :])
        try:
            return Path(where).read_bytes()
        except OSError as e:
            raise BenchError(f"image {ref!r}: cannot read {where}: {e.strerror or e}") from None

    def image(self, ref: str) -> Image.Image:
        try:
            return load_image(self.image_bytes(ref))
        except ImageError as e:
            raise BenchError(f"image {ref!r}: {e}") from None


def parse_manifest(text: str, source: str = "manifest") -> tuple[Sample, ...]:
    samples: list[Sample] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise BenchError(f"{source}:{lineno}: not JSON: {e.msg}") from None
        try:
            sample = Sample.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "sample"
            raise BenchError(f"{source}:{lineno}: {where}: {first['msg']}") from None
        if sample.id in seen:
            raise BenchError(f"{source}:{lineno}: duplicate sample id {sample.id!r}")
        chunks = [s.chunk for s in sample.switches]
        if chunks != sorted(set(chunks)):
            raise BenchError(f"{source}:{lineno}: switches must have increasing, distinct chunks")
        seen.add(sample.id)
        samples.append(sample)
    if not samples:
        raise BenchError(f"{source}: no samples")
    return tuple(samples)


def load_benchmark(source: str | Path, store: ObjectStore | None = None, name: str | None = None) -> Benchmark:
    """Read a manifest from a local path or "object:<key>"."""
    source = str(source)
    if source.startswith(OBJECT_PREFIX):
        if store is None:
            raise BenchError(f"manifest {source!r} is an object key but no object store is configured")
        key = source[len(OBJECT_PREFIX) :]
        data = store.get_bytes(key)
        base = OBJECT_PREFIX + posixpath.dirname(key)
        default_name = posixpath.splitext(posixpath.basename(key))[0]
    else:
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise BenchError(f"manifest {path}: {e.strerror or e}") from None
        base = str(path.resolve().parent)
        default_name = path.parent.name if path.stem == "manifest" else path.stem
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BenchError(f"manifest {source}: not UTF-8") from None
    samples = parse_manifest(text, source)
    return Benchmark(name or default_name, samples, hashlib.sha256(data).hexdigest(), base, store)


def check_samples(
    bench: Benchmark, plan: ChunkPlan, default_frames: int, samples: tuple[Sample, ...] | None = None
) -> None:
    """Every switch lands inside its sample's chunks; every image decodes. Raises BenchError."""
    for s in bench.samples if samples is None else samples:
        chunks = plan.chunks_for(s.frames or default_frames)
        for sw in s.switches:
            if sw.chunk >= chunks:
                raise BenchError(f"sample {s.id}: switch at chunk {sw.chunk} but the video has {chunks} chunks")
        for ref in (s.reference, s.garment, *(sw.garment for sw in s.switches)):
            bench.image(ref)
