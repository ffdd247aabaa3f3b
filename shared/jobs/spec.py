"""What a batch job is: the clip spec, the job record, its states and its result keys.

A `ClipSpec` is fully resolved (images are object-store keys), so a worker needs nothing but
the spec, the store and the engine. Its identity is `spec_hash` (every field but the labels);
the job id is derived from (tenant, idempotency key), so resubmitting a key finds the job.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.storage.base import validate_key

JOB_ID_PREFIX = "job_"
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9_.:@/+=\-]{1,128}$"
SEED_BITS = 63


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


def job_id_for(tenant: str, idempotency_key: str) -> str:
    """ "job_" + 26 lowercase base32 characters of sha256(tenant, key): one job per key."""
    digest = hashlib.sha256(f"{tenant}\n{idempotency_key}".encode()).digest()
    return JOB_ID_PREFIX + base64.b32encode(digest).decode("ascii")[:26].lower()


def derived_seed(tenant: str, idempotency_key: str) -> int:
    """The seed of a clip submitted without one: stable per (tenant, key), 63 bits."""
    digest = hashlib.sha256(f"seed\n{tenant}\n{idempotency_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - SEED_BITS)


class GarmentAt(BaseModel):
    """The garment worn from `chunk_index` on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chunk_index: int = Field(ge=0)
    object_key: str


class ClipSpec(BaseModel):
    """One clip, images resolved to object keys. `seed` is the effective seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reference_key: str
    garments: tuple[GarmentAt, ...] = Field(min_length=1)
    prompt: str = Field(min_length=1)
    chunks: int = Field(ge=1)
    seed: int = Field(ge=0, lt=2**64)
    idempotency_key: str = Field(pattern=IDEMPOTENCY_KEY_PATTERN)
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ClipSpec:
        validate_key(self.reference_key)
        indices = [g.chunk_index for g in self.garments]
        if indices[0] != 0:
            raise ValueError("the garment schedule must start at chunk 0")
        if any(b <= a for a, b in itertools.pairwise(indices)):
            raise ValueError("garment schedule chunk indices must increase strictly")
        if indices[-1] >= self.chunks:
            raise ValueError(f"garment scheduled at chunk {indices[-1]} of a {self.chunks}-chunk clip")
        for g in self.garments:
            validate_key(g.object_key)
        return self

    def identity(self) -> dict[str, Any]:
        """The fields that make the video (labels excluded)."""
        return self.model_dump(mode="json", exclude={"labels"})

    @property
    def spec_hash(self) -> str:
        """sha256 hex of the canonical JSON of `identity()`."""
        canonical = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def schedule(self) -> dict[int, str]:
        """chunk index -> object key of the garment put on at that chunk (0 included)."""
        return {g.chunk_index: g.object_key for g in self.garments}


class ResultKeys(BaseModel):
    """Deterministic object keys of one job's results."""

    model_config = ConfigDict(frozen=True)

    video: str
    manifest: str
    poster: str

    @classmethod
    def of(cls, prefix: str, tenant: str, job_id: str, spec_hash: str) -> ResultKeys:
        base = f"{prefix}/{tenant}/{job_id}/{spec_hash[:16]}"
        return cls(video=f"{base}/clip.mp4", manifest=f"{base}/manifest.json", poster=f"{base}/poster.png")


class JobResult(BaseModel):
    """A finished clip: where its objects are and what the video is (sizes in pixels)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    video_key: str
    manifest_key: str
    poster_key: str
    video_bytes: int
    frames: int
    fps: float
    width: int
    height: int
    frames_sha256: str  # of the raw uint8 RGB frames, chunk after chunk


class JobRecord(BaseModel):
    """A job as stored in Redis. Times are unix milliseconds of the Redis server clock."""

    model_config = ConfigDict(frozen=True, extra="ignore")  # tolerate fields of newer writers

    job_id: str
    tenant: str
    state: JobState
    spec: ClipSpec
    spec_hash: str
    attempts: int = 0
    max_attempts: int
    created_ms: int
    updated_ms: int
    started_ms: int | None = None
    finished_ms: int | None = None
    next_attempt_ms: int | None = None
    chunks_done: int = 0
    error: str = ""
    worker: str = ""  # consumer holding the current attempt
    entry: str = ""  # stream entry id of the current delivery
    cancel_requested: bool = False
    result: JobResult | None = None

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_JOB_STATES

    @classmethod
    def from_redis(cls, raw: dict[bytes, bytes]) -> JobRecord:
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        data: dict[str, Any] = {k: v for k, v in fields.items() if v != ""}
        data["spec"] = json.loads(fields["spec"])
        if "result" in data:
            data["result"] = json.loads(data["result"])
        data["cancel_requested"] = fields.get("cancel") == "1"
        return cls.model_validate(data)
