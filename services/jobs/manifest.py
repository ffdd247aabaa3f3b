"""The batch manifest: one clip per line of JSON (JSONL), checked whole before anything is sent.

    {"id": "anna-sku123", "reference": "models/anna.jpg", "garments": [[0, "catalog:sku-123"], [4, "red.png"]],
     "prompt": "walks toward the camera", "chunks": 8, "seed": 7, "labels": {"sku": "123"}}

Fields (services/jobs/README.md has the full description):
- `reference` (required): the person photo; `garments` (required, or `garment` for one garment
  worn throughout): [chunk_index, image] pairs or {"chunk": k, "image": ...} objects, starting
  at chunk 0, chunk indices increasing;
- an image is a local file path (relative to the manifest's folder), "catalog:<id>" or
  "object:<key>";
- `prompt` (required), `chunks` (required, >= 1), `seed` (optional), `labels` (optional
  string -> string), `id` (optional idempotency key; default: derived from the clip's content,
  so re-submitting an unchanged manifest never creates duplicate jobs).
Blank lines and lines starting with "#" are skipped. Every problem is reported with its line
number; a manifest with any problem submits nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fashionchameleon.v1 import common_pb2, studio_pb2
from shared.jobs.spec import IDEMPOTENCY_KEY_PATTERN
from shared.media.images import ImageError, load_image
from shared.models.prompts import validate_prompt

FIELDS = frozenset({"id", "reference", "garment", "garments", "prompt", "chunks", "seed", "labels"})
_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)
CATALOG_PREFIX, OBJECT_PREFIX = "catalog:", "object:"


class ManifestError(Exception):
    """Problems of a manifest, each as (line number, message); str() lists them."""

    def __init__(self, problems: list[tuple[int, str]], total: int | None = None) -> None:
        self.problems = problems
        self.total = total if total is not None else len(problems)
        lines = [f"line {n}: {msg}" for n, msg in problems]
        if self.total > len(problems):
            lines.append(f"... and {self.total - len(problems)} more problems")
        super().__init__("; ".join(lines))


@dataclass(frozen=True)
class ManifestImage:
    kind: str  # "file", "catalog" or "object"
    value: str  # absolute path, catalog id or object key
    sha256: str = ""  # of a file's bytes

    @property
    def ident(self) -> str:
        return f"sha256:{self.sha256}" if self.kind == "file" else f"{self.kind}:{self.value}"


@dataclass(frozen=True)
class ManifestClip:
    line: int  # 1-based line number in the manifest
    key: str  # idempotency key
    reference: ManifestImage
    garments: tuple[tuple[int, ManifestImage], ...]
    prompt: str
    chunks: int
    seed: int | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        return {
            "reference": self.reference.ident,
            "garments": [[k, g.ident] for k, g in self.garments],
            "prompt": self.prompt,
            "chunks": self.chunks,
            "seed": self.seed,
        }


class _Problem(Exception):
    pass


class _Files:
    """Local image files, read and decoded once each."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.cache: dict[Path, str | Exception] = {}

    def image(self, value: str) -> ManifestImage:
        if value.startswith(CATALOG_PREFIX) and value[len(CATALOG_PREFIX) :]:
            return ManifestImage("catalog", value[len(CATALOG_PREFIX) :])
        if value.startswith(OBJECT_PREFIX) and value[len(OBJECT_PREFIX) :]:
            return ManifestImage("object", value[len(OBJECT_PREFIX) :])
        path = (self.base_dir / value).expanduser().resolve()
        if path not in self.cache:
            try:
                data = path.read_bytes()
                load_image(data)
                self.cache[path] = hashlib.sha256(data).hexdigest()
            except FileNotFoundError:
                self.cache[path] = _Problem(f"image file {value!r} not found")
            except (OSError, ImageError) as e:
                self.cache[path] = _Problem(f"image file {value!r}: {e}")
        found = self.cache[path]
        if isinstance(found, Exception):
            raise found
        return ManifestImage("file", str(path), found)


def parse_manifest(text: str, base_dir: Path, *, max_reported: int = 20) -> list[ManifestClip]:
    """All clips of a manifest, or ManifestError with every problem found (first `max_reported`)."""
    files = _Files(base_dir)
    clips: list[ManifestClip] = []
    problems: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            clips.append(_parse_line(line, number, files))
        except _Problem as e:
            problems.append((number, str(e)))
    first: dict[str, ManifestClip] = {}
    for clip in clips:
        seen = first.setdefault(clip.key, clip)
        if seen is not clip and seen.identity() != clip.identity():
            problems.append((clip.line, f"id {clip.key!r} is already used on line {seen.line} for another clip"))
    if not clips and not problems:
        problems.append((0, "the manifest has no clips"))
    if problems:
        problems.sort()
        raise ManifestError(problems[:max_reported], total=len(problems))
    return clips


def _parse_line(line: str, number: int, files: _Files) -> ManifestClip:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Problem(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _Problem("expected a JSON object")
    unknown = sorted(set(obj) - FIELDS)
    if unknown:
        raise _Problem(f"unknown field(s) {', '.join(unknown)} (fields: {', '.join(sorted(FIELDS))})")
    chunks = obj.get("chunks")
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise _Problem("'chunks' must be an integer >= 1")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise _Problem("'prompt' is required (a string)")
    try:
        prompt = validate_prompt(prompt)
    except ValueError as e:
        raise _Problem(f"'prompt': {e}") from None
    reference = obj.get("reference")
    if not isinstance(reference, str) or not reference:
        raise _Problem("'reference' is required (a file path, 'catalog:<id>' or 'object:<key>')")
    garments = _schedule(obj, chunks, files)
    seed = obj.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64):
        raise _Problem("'seed' must be an integer in 0 .. 2^64-1")
    labels = obj.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise _Problem("'labels' must be an object of string values")
    ref = _image(files, reference, "reference")
    clip = ManifestClip(number, "", ref, garments, prompt, chunks, seed, dict(labels))
    key = obj.get("id")
    if key is None:
        canonical = json.dumps(clip.identity(), sort_keys=True, separators=(",", ":"))
        key = "auto-" + hashlib.sha256(canonical.encode()).hexdigest()[:40]
    elif not isinstance(key, str) or not _KEY.match(key):
        raise _Problem("'id' must be 1-128 characters of [A-Za-z0-9_.:@/+=-]")
    return ManifestClip(number, key, ref, garments, prompt, chunks, seed, dict(labels))


def _image(files: _Files, value: Any, where: str) -> ManifestImage:
    if not isinstance(value, str) or not value:
        raise _Problem(f"{where}: expected a file path, 'catalog:<id>' or 'object:<key>'")
    try:
        return files.image(value)
    except _Problem as e:
        raise _Problem(f"{where}: {e}") from None


def _schedule(obj: dict, chunks: int, files: _Files) -> tuple[tuple[int, ManifestImage], ...]:
    if ("garment" in obj) == ("garments" in obj):
        raise _Problem("give exactly one of 'garment' (worn throughout) and 'garments' (a schedule)")
    if "garment" in obj:
        return ((0, _image(files, obj["garment"], "garment")),)
    entries = obj["garments"]
    if not isinstance(entries, list) or not entries:
        raise _Problem("'garments' must be a non-empty list of [chunk_index, image] pairs")
    out: list[tuple[int, ManifestImage]] = []
    previous = -1
    for i, entry in enumerate(entries):
        where = f"garments[{i}]"
        if isinstance(entry, dict) and set(entry) == {"chunk", "image"}:
            chunk, image = entry["chunk"], entry["image"]
        elif isinstance(entry, list) and len(entry) == 2:
            chunk, image = entry
        else:
            raise _Problem(f'{where}: expected [chunk_index, image] or {{"chunk": k, "image": ...}}')
        if not isinstance(chunk, int) or isinstance(chunk, bool):
            raise _Problem(f"{where}: the chunk index must be an integer")
        if i == 0 and chunk != 0:
            raise _Problem(f"{where}: the schedule starts at chunk 0, got {chunk}")
        if chunk <= previous:
            raise _Problem(f"{where}: chunk indices must increase ({chunk} after {previous})")
        if chunk >= chunks:
            raise _Problem(f"{where}: chunk {chunk} is past the last chunk ({chunks - 1})")
        previous = chunk
        out.append((chunk, _image(files, image, where)))
    return tuple(out)


def build_request(clips: list[ManifestClip]) -> studio_pb2.SubmitClipsRequest:
    """One SubmitClipsRequest: each distinct local file is sent once, as a shared image."""
    shared: dict[str, int] = {}
    request = studio_pb2.SubmitClipsRequest()

    def image(img: ManifestImage) -> studio_pb2.ClipImage:
        if img.kind == "catalog":
            return studio_pb2.ClipImage(image=common_pb2.ImageInput(catalog_id=img.value))
        if img.kind == "object":
            return studio_pb2.ClipImage(image=common_pb2.ImageInput(object_key=img.value))
        if img.sha256 not in shared:
            shared[img.sha256] = len(request.shared_images)
            request.shared_images.add(data=Path(img.value).read_bytes())
        return studio_pb2.ClipImage(shared_index=shared[img.sha256])

    for clip in clips:
        spec = request.clips.add(
            reference=image(clip.reference),
            prompt=clip.prompt,
            chunks=clip.chunks,
            idempotency_key=clip.key,
            labels=clip.labels,
        )
        for chunk, garment in clip.garments:
            spec.garments.add(chunk_index=chunk, garment=image(garment))
        if clip.seed is not None:
            spec.seed = clip.seed
    return request
