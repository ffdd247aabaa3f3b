"""Validation of the batch job RPCs: public protos -> frozen specs, or an API error.

Same rules as services/studio/validation.py (the image and prompt checks are services/common/validation.py):
failures raise `InvalidArgument` (`NotFound` for an object key outside the tenant's prefixes)
with the field path in the message and in ErrorInfo metadata "field", here prefixed with the
clip, e.g. "clips[3].garments[1].garment.image.data", plus metadata "index" (the clip).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from fashionchameleon.v1 import studio_pb2
from services.common.errors import ServiceError
from services.common.validation import ImageRef, Limits, invalid, parse_image, parse_prompt
from shared.jobs.config import JobsConfig
from shared.jobs.queue import decode_page_token
from shared.jobs.spec import IDEMPOTENCY_KEY_PATTERN, JobState

JOB_ID = re.compile(r"^job_[a-z2-7]{26}$")
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)
_LABEL_KEY = re.compile(r"^[A-Za-z0-9_.:/\-]{1,64}$")
MAX_LABELS = 16
MAX_LABEL_VALUE_CHARS = 256

PROTO_STATES: dict[JobState, int] = {
    JobState.QUEUED: studio_pb2.Job.QUEUED,
    JobState.RUNNING: studio_pb2.Job.RUNNING,
    JobState.RETRYING: studio_pb2.Job.RETRYING,
    JobState.CANCELLING: studio_pb2.Job.CANCELLING,
    JobState.SUCCEEDED: studio_pb2.Job.SUCCEEDED,
    JobState.FAILED: studio_pb2.Job.FAILED,
    JobState.CANCELLED: studio_pb2.Job.CANCELLED,
}
STATES_BY_PROTO = {v: k for k, v in PROTO_STATES.items()}


@dataclass(frozen=True)
class ClipRequest:
    """A ClipSpec after validation; images are checked but not yet stored or looked up."""

    reference: ImageRef
    garments: tuple[tuple[int, ImageRef], ...]  # (first chunk, garment), chunk 0 first
    prompt: str
    chunks: int
    seed: int | None  # None: derived from (tenant, idempotency key)
    idempotency_key: str
    labels: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def field_prefix(prefix: str, index: int | None = None) -> Iterator[None]:
    """Re-raise API errors from the block with `prefix.` before their field path (and the
    clip `index` in metadata)."""
    try:
        yield
    except ServiceError as e:
        metadata = dict(e.metadata)
        if "field" in metadata:  # the message starts with the field path
            metadata["field"] = f"{prefix}.{metadata['field']}"
            message = f"{prefix}.{e.message}"
        else:
            metadata["field"] = prefix
            message = f"{prefix}: {e.message}"
        if index is not None:
            metadata.setdefault("index", str(index))
        raise type(e)(message, reason=e.reason, metadata=metadata, retry_after_s=e.retry_after_s) from None


def parse_submit_clips(
    req: studio_pb2.SubmitClipsRequest, limits: Limits, jobs: JobsConfig, *, tenant: str | None = None
) -> list[ClipRequest]:
    """Validate a whole SubmitClipsRequest (any problem rejects the batch)."""
    if not req.clips:
        invalid("clips", "at least one clip is required")
    if len(req.clips) > jobs.max_clips_per_batch:
        invalid(
            "clips",
            f"{len(req.clips)} clips, over the limit of {jobs.max_clips_per_batch} per call",
            limit=jobs.max_clips_per_batch,
        )
    if len(req.shared_images) > jobs.max_shared_images:
        invalid(
            "shared_images",
            f"{len(req.shared_images)} images, over the limit of {jobs.max_shared_images}",
            limit=jobs.max_shared_images,
        )
    shared: list[ImageRef] = []
    for i, image in enumerate(req.shared_images):
        with field_prefix(f"shared_images[{i}]"):
            shared.append(parse_image(studio_pb2.ClipImage(image=image), "image", limits, tenant=tenant))
    return [_parse_clip(clip, i, shared, limits, jobs, tenant) for i, clip in enumerate(req.clips)]


def _parse_clip(
    clip: studio_pb2.ClipSpec,
    index: int,
    shared: list[ImageRef],
    limits: Limits,
    jobs: JobsConfig,
    tenant: str | None,
) -> ClipRequest:
    with field_prefix(f"clips[{index}]", index):
        if not clip.idempotency_key:
            invalid("idempotency_key", "required (a client key unique per clip)")
        if not _IDEMPOTENCY_KEY.match(clip.idempotency_key):
            invalid("idempotency_key", "must be 1-128 characters of [A-Za-z0-9_.:@/+=-]")
        if not 1 <= clip.chunks <= jobs.max_chunks_per_clip:
            invalid(
                "chunks", f"must be in 1..{jobs.max_chunks_per_clip}, got {clip.chunks}", limit=jobs.max_chunks_per_clip
            )
        prompt = parse_prompt(clip.prompt, limits, "prompt")
        reference = _clip_image(clip, "reference", shared, limits, tenant)
        garments = _schedule(clip, shared, limits, jobs, tenant)
        return ClipRequest(
            reference=reference,
            garments=garments,
            prompt=prompt,
            chunks=clip.chunks,
            seed=clip.seed if clip.HasField("seed") else None,
            idempotency_key=clip.idempotency_key,
            labels=_labels(clip.labels),
        )


def _clip_image(msg, name: str, shared: list[ImageRef], limits: Limits, tenant: str | None) -> ImageRef:
    if not msg.HasField(name):
        invalid(name, "required (an image or a shared_index)")
    image: studio_pb2.ClipImage = getattr(msg, name)
    source = image.WhichOneof("source")
    if source == "shared_index":
        if not 0 <= image.shared_index < len(shared):
            invalid(
                f"{name}.shared_index", f"{image.shared_index} is not an index of shared_images (0..{len(shared) - 1})"
            )
        return shared[image.shared_index]
    if source == "image":
        with field_prefix(name):
            return parse_image(image, "image", limits, tenant=tenant)
    invalid(name, "needs an image or a shared_index")


def _schedule(
    clip: studio_pb2.ClipSpec, shared: list[ImageRef], limits: Limits, jobs: JobsConfig, tenant: str | None
) -> tuple[tuple[int, ImageRef], ...]:
    if not clip.garments:
        invalid("garments", "at least one garment (chunk_index 0) is required")
    if len(clip.garments) > jobs.max_schedule_entries:
        invalid(
            "garments",
            f"{len(clip.garments)} entries, over the limit of {jobs.max_schedule_entries}",
            limit=jobs.max_schedule_entries,
        )
    out: list[tuple[int, ImageRef]] = []
    previous = -1
    for i, entry in enumerate(clip.garments):
        where = f"garments[{i}].chunk_index"
        if i == 0 and entry.chunk_index != 0:
            invalid(where, f"the schedule starts at chunk 0, got {entry.chunk_index}")
        if entry.chunk_index <= previous:
            invalid(where, f"chunk indices must increase strictly ({entry.chunk_index} after {previous})")
        if entry.chunk_index >= clip.chunks:
            invalid(where, f"chunk {entry.chunk_index} is past the last chunk ({clip.chunks - 1})")
        previous = entry.chunk_index
        with field_prefix(f"garments[{i}]"):
            out.append((entry.chunk_index, _clip_image(entry, "garment", shared, limits, tenant)))
    return tuple(out)


def _labels(labels) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        invalid("labels", f"{len(labels)} labels, over the limit of {MAX_LABELS}", limit=MAX_LABELS)
    for key, value in labels.items():
        if not _LABEL_KEY.match(key):
            invalid("labels", "keys must be 1-64 characters of [A-Za-z0-9_.:/-]")
        if len(value) > MAX_LABEL_VALUE_CHARS or not value.isprintable():
            invalid(f"labels.{key}", f"values must be printable, at most {MAX_LABEL_VALUE_CHARS} characters")
    return dict(sorted(labels.items()))


def validate_job_id(value: str, field_name: str = "job_id") -> str:
    if not value:
        invalid(field_name, "required")
    if not JOB_ID.match(value):
        invalid(field_name, "not a job id (expected 'job_' + 26 base32 characters)")
    return value


@dataclass(frozen=True)
class ListSpec:
    page_size: int
    page_token: str
    states: frozenset[JobState]


def parse_list_jobs(req: studio_pb2.ListJobsRequest, jobs: JobsConfig) -> ListSpec:
    """page_size 0 -> the default; larger than the maximum -> the maximum."""
    if req.page_size < 0:
        invalid("page_size", f"must be >= 0, got {req.page_size}")
    if req.page_token:
        try:
            decode_page_token(req.page_token)
        except ValueError:
            invalid("page_token", "not a page token of ListJobs")
    states = set()
    for value in req.states:
        if value not in STATES_BY_PROTO:
            invalid("states", f"unknown or unspecified job state {value}")
        states.add(STATES_BY_PROTO[value])
    size = min(req.page_size or jobs.default_page_size, jobs.max_page_size)
    return ListSpec(size, req.page_token, frozenset(states))


def parse_watch_jobs(req: studio_pb2.WatchJobsRequest, jobs: JobsConfig) -> list[str]:
    if len(req.job_ids) > jobs.max_watch_jobs:
        invalid(
            "job_ids", f"{len(req.job_ids)} jobs, over the limit of {jobs.max_watch_jobs}", limit=jobs.max_watch_jobs
        )
    return list(dict.fromkeys(validate_job_id(j, f"job_ids[{i}]") for i, j in enumerate(req.job_ids)))
