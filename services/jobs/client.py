"""Python client of the batch job RPCs: `StudioClient` plus SubmitClips / GetJob / ListJobs /
CancelJob / WatchJobs (same metadata, errors and retry policy as StudioClient).

    with JobsClient("localhost:9000", api_key) as client:
        jobs = client.submit_clips([clip_spec("person.png", [(0, "catalog:sku-1")], "walks", 4, key="a")])
        for event in client.watch_jobs([j.job_id for j in jobs]):
            print(event.job.state, event.job.chunks_done)

SubmitClips is idempotent per clip (idempotency keys), so retries on UNAVAILABLE are safe.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

import grpc

from fashionchameleon.v1 import studio_pb2
from services.studio.client import ImageLike, StudioClient, StudioError, image_input

__all__ = ["JobsClient", "clip_spec"]

FINAL_STATES = frozenset({studio_pb2.Job.SUCCEEDED, studio_pb2.Job.FAILED, studio_pb2.Job.CANCELLED})


def _clip_image(image: ImageLike | int) -> studio_pb2.ClipImage:
    """An int is an index into SubmitClipsRequest.shared_images; anything else an image."""
    if isinstance(image, int) and not isinstance(image, bool):
        return studio_pb2.ClipImage(shared_index=image)
    return studio_pb2.ClipImage(image=image_input(image))


def clip_spec(
    reference: ImageLike | int,
    garments: Sequence[tuple[int, ImageLike | int]],
    prompt: str,
    chunks: int,
    *,
    key: str,
    seed: int | None = None,
    labels: Mapping[str, str] | None = None,
) -> studio_pb2.ClipSpec:
    """A ClipSpec; images as in StudioClient (bytes, path, "catalog:<id>", "object:<key>") or
    an int index into the request's shared images."""
    spec = studio_pb2.ClipSpec(
        reference=_clip_image(reference),
        garments=[studio_pb2.GarmentAt(chunk_index=k, garment=_clip_image(g)) for k, g in garments],
        prompt=prompt,
        chunks=chunks,
        idempotency_key=key,
        labels=dict(labels or {}),
    )
    if seed is not None:
        spec.seed = seed
    return spec


class JobsClient(StudioClient):
    def submit_clips(
        self, clips: Sequence[studio_pb2.ClipSpec], shared_images: Sequence[ImageLike] = ()
    ) -> list[studio_pb2.Job]:
        request = studio_pb2.SubmitClipsRequest(clips=clips, shared_images=[image_input(i) for i in shared_images])
        return list(self._unary(self._stub.SubmitClips, request).jobs)

    def submit_request(self, request: studio_pb2.SubmitClipsRequest) -> list[studio_pb2.Job]:
        return list(self._unary(self._stub.SubmitClips, request).jobs)

    def get_job(self, job_id: str) -> studio_pb2.Job:
        return self._unary(self._stub.GetJob, studio_pb2.GetJobRequest(job_id=job_id))

    def cancel_job(self, job_id: str) -> studio_pb2.Job:
        return self._unary(self._stub.CancelJob, studio_pb2.CancelJobRequest(job_id=job_id))

    def list_jobs(
        self, page_size: int = 0, page_token: str = "", states: Iterable[int] = ()
    ) -> studio_pb2.ListJobsResponse:
        request = studio_pb2.ListJobsRequest(page_size=page_size, page_token=page_token, states=list(states))
        return self._unary(self._stub.ListJobs, request)

    def iter_jobs(self, states: Iterable[int] = (), page_size: int = 0) -> Iterator[studio_pb2.Job]:
        """Every job of the tenant, newest first, page after page."""
        token, states = "", list(states)
        while True:
            page = self.list_jobs(page_size, token, states)
            yield from page.jobs
            if not page.next_page_token:
                return
            token = page.next_page_token

    def watch_jobs(
        self, job_ids: Sequence[str] = (), *, timeout_s: float | None = None
    ) -> Iterator[studio_pb2.JobEvent]:
        """Job events (the current state of each job first); ends when every job is final.
        Reconnects on UNAVAILABLE (a new call starts with the jobs' current state again)."""
        pending = list(job_ids)
        attempt = 0
        while True:
            call = self._stub.WatchJobs(
                studio_pb2.WatchJobsRequest(job_ids=pending), metadata=self._metadata, timeout=timeout_s
            )
            try:
                for event in call:
                    attempt = 0
                    yield event
                    if pending and event.job.state in FINAL_STATES and event.job.job_id in pending:
                        pending.remove(event.job.job_id)
                        if not pending:
                            call.cancel()
                            return
                return
            except grpc.RpcError as e:
                error = StudioError.from_rpc_error(e)
                delay = self.policy.unary_delay(error, attempt)
                if delay is None or not job_ids:
                    raise error from e
                attempt += 1
                time.sleep(delay)
