"""The per-clip record every stage reads and extends, and the output-store layout.

A clip is "pending" until a stage drops it (status "dropped", `stage` + `reason` say where and
why) or the last stage keeps it ("kept"). Dropped records flow on through the remaining
stages untouched, so the run's final stream holds every clip with its fate.

Output-store layout (keys under the run's `output_prefix`):

    manifest.jsonl                       kept triplets, the training preprocessing's input
    samples/{clip_id}/video.mp4          the sub-clip
    samples/{clip_id}/reference.png      person wearing another garment (stage 4)
    samples/{clip_id}/garment.png        extracted garment (stage 3)
    report/report.json, report/drops.jsonl, report/*.png
    _state/videos/{video_id}.json        stage-1 segmentation of one raw video (resume)
    _state/clips/{clip_id}/{stage}.json  the record after each stage (resume)
    _work/clips/{clip_id}.mp4            sub-clips cut by stage 1
    _work/clips/{clip_id}/*.png          intermediate images (try-off / try-on results)
    _cache/vlm/{sha256}.json             VLM answers keyed by the request's content hash
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["pending", "kept", "dropped"]
STAGES = ("segment", "filter", "caption", "garment", "reference", "finalize")


@dataclass
class ClipRecord:
    clip_id: str
    video_key: str  # raw video's key in the input store
    video_id: str
    fps: float
    start_frame: int  # in the raw video, inclusive
    end_frame: int  # exclusive
    status: Status = "pending"
    stage: str = "segment"  # the last stage that looked at the clip
    reason: str | None = None  # why dropped: "{stage}:{kind}[: detail]"
    scores: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # checks that did not run, retries, ...
    captions: dict[str, Any] = field(default_factory=dict)
    garment_type: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> output-store key (relative)

    @property
    def seconds(self) -> float:
        return (self.end_frame - self.start_frame) / self.fps if self.fps else 0.0

    @property
    def pending(self) -> bool:
        return self.status == "pending"

    def drop(self, stage: str, kind: str, detail: str = "") -> ClipRecord:
        self.status, self.stage = "dropped", stage
        self.reason = f"{stage}:{kind}" + (f": {detail}" if detail else "")
        return self

    @property
    def reason_kind(self) -> str | None:
        """ "stage:kind" without the detail (what the report counts)."""
        return None if self.reason is None else self.reason.split(": ", 1)[0]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ClipRecord:
        return cls(**json.loads(text))


def row(rec: ClipRecord) -> dict[str, str]:
    """A Ray Data row: the record as one JSON string (a fixed Arrow schema whatever it holds)."""
    return {"clip_id": rec.clip_id, "record": rec.to_json()}


def from_row(r: dict[str, Any]) -> ClipRecord:
    return ClipRecord.from_json(r["record"])


_UNSAFE = re.compile(r"[^a-z0-9._-]+")


def video_id(key: str) -> str:
    """Stable id of a raw video: its sanitised file stem plus 8 hex digits of the key's hash."""
    stem = key.rsplit("/", 1)[-1].rsplit(".", 1)[0].lower()
    stem = _UNSAFE.sub("-", stem).strip("-.")[:40] or "video"
    return f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


class Layout:
    """Keys of the run's objects under `prefix` ("" or ending in "/")."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"

    def key(self, rel: str) -> str:
        return self.prefix + rel

    def video_state(self, vid: str) -> str:
        return self.key(f"_state/videos/{vid}.json")

    def clip_state(self, clip_id: str, stage: str) -> str:
        return self.key(f"_state/clips/{clip_id}/{stage}.json")

    @staticmethod
    def work_clip(clip_id: str) -> str:  # relative keys: records store them, the manifest too
        return f"_work/clips/{clip_id}.mp4"

    @staticmethod
    def work_image(clip_id: str, name: str) -> str:
        return f"_work/clips/{clip_id}/{name}.png"

    @staticmethod
    def sample(clip_id: str, name: str) -> str:
        return f"samples/{clip_id}/{name}"

    def vlm_cache(self, digest: str) -> str:
        return self.key(f"_cache/vlm/{digest}.json")
