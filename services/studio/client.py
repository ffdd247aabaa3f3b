"""Python client of the public ``Studio`` gRPC API (``fashionchameleon.v1``), sync and asyncio.

    with StudioClient("localhost:9000", api_key) as studio:
        session = studio.create_session("person.jpg", "catalog:sku-123", "walks towards the camera")
        stats = studio.save(session.session_id, "out.mp4", max_chunks=20)

    async with AsyncStudioClient("localhost:9000", api_key) as studio:
        session = await studio.create_session(Path("person.jpg"), garment_bytes, "turns around")
        async for chunk in studio.stream(session.session_id):
            ...

Metadata: every call carries the API key as ``x-api-key`` and, as ``studio.proto`` specifies, as
``authorization: Bearer <key>``; plus ``application: <name>`` when ``application`` is given (the
Ray Serve gRPC proxy routes on it). The key is never part of a repr, an exception or a log line.

Images (``reference`` / ``garment``): ``bytes`` (encoded JPEG/PNG/WebP, sent by value), a
``Path`` or a ``str`` path (read and sent by value), ``"catalog:<id>"`` (garment catalog item),
``"object:<key>"`` (an object already in the object store), or a ``common_pb2.ImageInput``.

Errors: every failed RPC raises :class:`StudioError` with the gRPC status ``code``, the
``google.rpc.ErrorInfo`` ``reason`` (e.g. ``"SESSION_NOT_FOUND"``) and ``metadata`` parsed from
the ``grpc-status-details-bin`` trailer, the human ``details`` and ``retry_after_s`` from a
``google.rpc.RetryInfo``. Branch on ``code`` and ``reason`` only.

Retries: unary calls are retried with exponential backoff and jitter on ``UNAVAILABLE``, and on
``RESOURCE_EXHAUSTED`` only when the server sent a ``RetryInfo`` (its delay is honoured). The
non-idempotent calls (CreateSession, SwitchGarment, UpdatePrompt) always carry a ``request_id``
(generated when the caller gives none), so a retry can never act twice; CloseSession and
GetSession are idempotent.

Streaming: :meth:`StudioClient.stream` yields chunks in index order with no gaps and no
duplicates. On ``UNAVAILABLE`` / ``ABORTED`` / a reset stream / a stream that ends without an
``end_of_stream`` message it reconnects with ``resume_from_index`` = the next index it has not
yielded (``auto_resume``; at most ``max_reconnects`` reconnects in a row without a new chunk).
The first message of every StreamSession call carries the init segment again, so the raw
``fmp4`` bytes of a resumed stream can be appended to an MSE SourceBuffer as they are;
:meth:`StudioClient.save` drops such repeated (identical) init segments so the file is one
playable fragmented MP4. A server that skips an index raises :class:`ChunkGapError`.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from fashionchameleon.v1 import common_pb2, studio_pb2, studio_pb2_grpc

# The Ray Serve application name of the suite; Ray's gRPC proxy routes on this metadata.
DEFAULT_APPLICATION = "fashionchameleon"

__all__ = [
    "AsyncStudioClient",
    "ChunkGapError",
    "ImageLike",
    "RetryPolicy",
    "StudioClient",
    "StudioError",
    "build_create_session_request",
    "build_switch_garment_request",
    "build_update_prompt_request",
    "image_input",
    "session_options",
    "switch_options",
]

ImageLike = bytes | bytearray | memoryview | Path | str | common_pb2.ImageInput

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
STATUS_DETAILS_KEY = "grpc-status-details-bin"
CATALOG_PREFIX = "catalog:"
OBJECT_PREFIX = "object:"


# -- errors ------------------------------------------------------------------------------------


class StudioError(Exception):
    """A failed Studio call: gRPC status code + ErrorInfo reason (see common.proto "Errors").

    ``reason`` is the ErrorReason name without the ``ERROR_REASON_`` prefix (``""`` when the
    server sent no ErrorInfo); ``metadata`` the ErrorInfo metadata; ``retry_after_s`` the
    RetryInfo delay in seconds (``None`` when absent).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str = "",
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.code = code
        self.details = details
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.retry_after_s = retry_after_s
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.code.name}"
        if self.reason:
            text += f" ({self.reason})"
        if self.details:
            text += f": {self.details}"
        if self.retry_after_s is not None:
            text += f" [retry after {self.retry_after_s:g} s]"
        return text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r}, "
            f"details={self.details!r}, metadata={self.metadata!r}, "
            f"retry_after_s={self.retry_after_s!r})"
        )

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> StudioError:
        """Build from a sync ``grpc.RpcError`` or a ``grpc.aio.AioRpcError``."""
        code = _call_attr(error, "code") or grpc.StatusCode.UNKNOWN
        details = _call_attr(error, "details") or ""
        reason, domain, metadata, retry_after = _parse_status_details(_call_attr(error, "trailing_metadata"))
        return cls(code, details, reason=reason, domain=domain, metadata=metadata, retry_after_s=retry_after)


class ChunkGapError(StudioError):
    """The server skipped a chunk index (client-side check; reason ``CHUNK_INDEX_GAP``)."""

    def __init__(self, session_id: str, expected_index: int, received_index: int) -> None:
        super().__init__(
            grpc.StatusCode.DATA_LOSS,
            f"session {session_id}: expected chunk {expected_index}, server sent {received_index}",
            reason="CHUNK_INDEX_GAP",
            metadata={
                "session_id": session_id,
                "expected_index": str(expected_index),
                "received_index": str(received_index),
            },
        )
        self.expected_index = expected_index
        self.received_index = received_index


def _call_attr(error: Any, name: str) -> Any:
    attr = getattr(error, name, None)
    if not callable(attr):
        return None
    try:
        return attr()
    except Exception:  # noqa: BLE001 - an odd RpcError without call state
        return None


def _parse_status_details(
    trailing_metadata: Any,
) -> tuple[str, str, dict[str, str], float | None]:
    """(reason, domain, metadata, retry_after_s) from the ``grpc-status-details-bin`` trailer."""
    reason, domain, metadata, retry_after = "", "", {}, None
    for key, value in trailing_metadata or ():
        if key != STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value if isinstance(value, bytes) else bytes(value, "latin-1"))
        except (DecodeError, TypeError, ValueError):
            continue
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info) and not reason:
                    reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                if detail.Unpack(retry):
                    delay = retry.retry_delay
                    retry_after = max(0.0, delay.seconds + delay.nanos / 1e9)
    return reason, domain, metadata, retry_after


# -- retry policy ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for unary retries and stream reconnects.

    Delay of attempt ``n`` (0-based): ``d = min(backoff_max_s, backoff_base_s * 2**n)``, drawn
    uniformly from ``[d/2, d]`` (jitter). A server RetryInfo delay replaces it (plus up to 10 %
    jitter); a RetryInfo delay above ``max_retry_after_s`` is not waited for (the error is
    raised).
    """

    retries: int = 3
    backoff_base_s: float = 0.1
    backoff_max_s: float = 5.0
    max_retry_after_s: float = 60.0

    def backoff(self, attempt: int) -> float:
        d = min(self.backoff_max_s, self.backoff_base_s * 2 ** min(attempt, 32))
        return d / 2 + random.uniform(0, d / 2)

    def delay(self, error: StudioError, attempt: int, *, stream: bool = False) -> float | None:
        """Seconds to wait before retrying after ``error``, or None when it must not be retried."""
        code = error.code
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            if error.retry_after_s is None:  # a quota without a retry hint: retrying won't help
                return None
        elif not (code == grpc.StatusCode.UNAVAILABLE or (stream and _stream_resumable(error))):
            return None
        if error.retry_after_s is not None:
            if error.retry_after_s > self.max_retry_after_s:
                return None
            return error.retry_after_s * (1 + random.uniform(0, 0.1))
        return self.backoff(attempt)

    def unary_delay(self, error: StudioError, attempt: int) -> float | None:
        if attempt >= self.retries:
            return None
        return self.delay(error, attempt)


def _stream_resumable(error: StudioError) -> bool:
    """Stream-only reconnect conditions besides UNAVAILABLE / RESOURCE_EXHAUSTED+RetryInfo."""
    if error.code == grpc.StatusCode.ABORTED:  # session moved replica: the gateway rebuilds it
        return True
    # A proxy or load balancer resetting the HTTP/2 stream surfaces as INTERNAL; reconnecting is
    # harmless (a session that really failed answers with end_of_stream / FAILED).
    return error.code == grpc.StatusCode.INTERNAL and "RST_STREAM" in error.details


# -- request building --------------------------------------------------------------------------


def image_input(image: ImageLike) -> common_pb2.ImageInput:
    """``ImageInput`` from bytes, a path, ``"catalog:<id>"``, ``"object:<key>"`` or an ImageInput."""
    if isinstance(image, common_pb2.ImageInput):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        if not len(image):
            raise ValueError("image bytes are empty")
        return common_pb2.ImageInput(data=bytes(image))
    if isinstance(image, str):
        if image.startswith(CATALOG_PREFIX):
            catalog_id = image[len(CATALOG_PREFIX) :]
            if not catalog_id:
                raise ValueError("empty catalog id")
            return common_pb2.ImageInput(catalog_id=catalog_id)
        if image.startswith(OBJECT_PREFIX):
            key = image[len(OBJECT_PREFIX) :]
            if not key:
                raise ValueError("empty object key")
            return common_pb2.ImageInput(object_key=key)
        image = Path(image)
    if isinstance(image, Path):
        if not image.is_file():
            raise FileNotFoundError(f"image file not found: {image} (catalog garments are given as 'catalog:<id>')")
        return image_input(image.read_bytes())
    raise TypeError(f"unsupported image type {type(image).__name__}")


def session_options(
    options: Mapping[str, Any] | common_pb2.SessionOptions | None = None,
    *,
    seed: int | None = None,
) -> common_pb2.SessionOptions | None:
    """``SessionOptions`` from a dict of its fields (nested ``switch_options`` dict allowed)."""
    if options is None:
        msg = common_pb2.SessionOptions()
    elif isinstance(options, common_pb2.SessionOptions):
        msg = common_pb2.SessionOptions()
        msg.CopyFrom(options)
    else:
        msg = _parse_dict(options, common_pb2.SessionOptions())
    if seed is not None:
        msg.seed = int(seed)
    return msg if options is not None or seed is not None else None


def switch_options(
    options: Mapping[str, Any] | common_pb2.SwitchOptions | None,
) -> common_pb2.SwitchOptions | None:
    """``SwitchOptions`` from a dict like ``{"withdraw_history_kv": False}``."""
    if options is None or isinstance(options, common_pb2.SwitchOptions):
        return options
    return _parse_dict(options, common_pb2.SwitchOptions())


def _parse_dict(values: Mapping[str, Any], message: Any) -> Any:
    if not isinstance(values, Mapping):
        raise TypeError(f"options must be a dict or {message.DESCRIPTOR.name}")
    try:
        return json_format.ParseDict(dict(values), message)
    except json_format.ParseError as e:
        raise ValueError(f"bad {message.DESCRIPTOR.name}: {e}") from None


def _request_id(request_id: str | None) -> str:
    if request_id is None:
        return uuid.uuid4().hex
    if not isinstance(request_id, str) or not request_id or len(request_id) > 128:
        raise ValueError("request_id must be a non-empty string of at most 128 characters")
    return request_id


def _session_id(session_id: str) -> str:
    if not isinstance(session_id, str) or not session_id:
        raise ValueError("session_id must be a non-empty string")
    return session_id


def _prompt(prompt: str) -> str:
    if not isinstance(prompt, str):
        raise TypeError("prompt must be a str")
    return prompt


def build_create_session_request(
    reference: ImageLike,
    garment: ImageLike,
    prompt: str,
    *,
    seed: int | None = None,
    options: Mapping[str, Any] | common_pb2.SessionOptions | None = None,
    request_id: str | None = None,
) -> studio_pb2.CreateSessionRequest:
    return studio_pb2.CreateSessionRequest(
        reference=image_input(reference),
        garment=image_input(garment),
        prompt=_prompt(prompt),
        options=session_options(options, seed=seed),
        request_id=_request_id(request_id),
    )


def build_switch_garment_request(
    session_id: str,
    garment: ImageLike,
    *,
    options: Mapping[str, Any] | common_pb2.SwitchOptions | None = None,
    request_id: str | None = None,
) -> studio_pb2.SwitchGarmentRequest:
    return studio_pb2.SwitchGarmentRequest(
        session_id=_session_id(session_id),
        garment=image_input(garment),
        options=switch_options(options),
        request_id=_request_id(request_id),
    )


def build_update_prompt_request(
    session_id: str, prompt: str, *, request_id: str | None = None
) -> studio_pb2.UpdatePromptRequest:
    return studio_pb2.UpdatePromptRequest(
        session_id=_session_id(session_id), prompt=_prompt(prompt), request_id=_request_id(request_id)
    )


def _call_metadata(api_key: str, application: str | None) -> tuple[tuple[str, str], ...]:
    if not isinstance(api_key, str) or not api_key:
        raise ValueError("api_key must be a non-empty string")
    if not api_key.isascii() or not api_key.isprintable():
        raise ValueError("api_key must be printable ASCII")
    md: list[tuple[str, str]] = [("x-api-key", api_key), ("authorization", f"Bearer {api_key}")]
    if application is not None:
        md.append(("application", application))
    return tuple(md)


def _channel_options(max_message_bytes: int, extra: Mapping[str, Any] | None) -> list[tuple[str, Any]]:
    opts: dict[str, Any] = {
        "grpc.max_send_message_length": int(max_message_bytes),
        "grpc.max_receive_message_length": int(max_message_bytes),
    }
    opts.update(extra or {})
    return list(opts.items())


# -- streaming state ---------------------------------------------------------------------------


def _has_media(chunk: studio_pb2.VideoChunk) -> bool:
    return bool(chunk.fmp4) or chunk.num_frames > 0


class _StreamCursor:
    """Resume bookkeeping of one logical stream: next index, gap/duplicate checks, reconnects."""

    def __init__(
        self,
        session_id: str,
        start_index: int,
        *,
        auto_resume: bool,
        max_reconnects: int,
        policy: RetryPolicy,
    ) -> None:
        if start_index < 0:
            raise ValueError("resume_from_index must be >= 0")
        self.session_id = _session_id(session_id)
        self.next_index = int(start_index)
        self.auto_resume = auto_resume
        self.max_reconnects = max_reconnects
        self.policy = policy
        self.failures = 0  # reconnects in a row without a new chunk
        self.reconnects = 0
        self.ended = False
        self.end_state = studio_pb2.Session.STATE_UNSPECIFIED

    def request(self) -> studio_pb2.StreamSessionRequest:
        return studio_pb2.StreamSessionRequest(session_id=self.session_id, resume_from_index=self.next_index)

    def accept(self, chunk: studio_pb2.VideoChunk) -> bool:
        """True if the chunk is to be yielded; raises ChunkGapError when an index was skipped."""
        if chunk.end_of_stream:
            self.ended = True
            self.end_state = chunk.end_state
        if chunk.index > self.next_index:
            raise ChunkGapError(self.session_id, self.next_index, chunk.index)
        if not _has_media(chunk):  # end-of-stream marker (index = chunks generated)
            return chunk.end_of_stream
        if chunk.index < self.next_index:  # already yielded (server resent it)
            return False
        self.next_index += 1
        self.failures = 0
        return True

    def reconnect_delay(self, error: StudioError | None) -> float | None:
        """Delay before reconnecting after ``error`` (None: the stream ended without
        end_of_stream); returns None when the stream should just end, raises when it fails."""
        if not self.auto_resume:
            if error is not None:
                raise error
            return None
        if error is None:
            error = StudioError(
                grpc.StatusCode.UNAVAILABLE,
                f"stream of session {self.session_id} ended without end_of_stream",
            )
        delay = self.policy.delay(error, self.failures, stream=True)
        if delay is None:
            raise error
        if self.failures >= self.max_reconnects:
            raise StudioError(
                error.code,
                f"gave up after {self.failures} reconnects without progress: {error.details}",
                reason=error.reason,
                domain=error.domain,
                metadata=error.metadata,
                retry_after_s=error.retry_after_s,
            ) from error
        self.failures += 1
        self.reconnects += 1
        return delay


def _percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class _ChunkRecorder:
    """Writes chunks to one fMP4 file (dropping repeated identical init segments) and times them."""

    def __init__(self, path: str | Path, max_chunks: int | None) -> None:
        if max_chunks is not None and max_chunks <= 0:
            raise ValueError("max_chunks must be positive")
        self.path = Path(path)
        self.max_chunks = max_chunks
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._init: bytes | None = None
        self._t0 = time.monotonic()
        self._arrivals: list[float] = []
        self.chunks = self.frames = self.bytes = 0
        self.video_seconds = 0.0
        self.first_index: int | None = None
        self.last_index: int | None = None

    def add(self, chunk: studio_pb2.VideoChunk) -> bool:
        """Record one yielded chunk; True once max_chunks media chunks were written."""
        if not _has_media(chunk):
            return False
        self._arrivals.append(time.monotonic())
        data = chunk.fmp4
        if chunk.is_init_segment_included:
            from shared.media.fmp4 import split_init_segment

            try:
                init, media = split_init_segment(data)
            except ValueError:
                init, media = None, data
            if init is not None:
                if init == self._init:
                    data = media  # the resumed stream's repeated init segment
                else:
                    self._init = init
        self._file.write(data)
        self.bytes += len(data)
        self.chunks += 1
        self.frames += chunk.num_frames
        self.video_seconds += chunk.duration_seconds
        self.first_index = chunk.index if self.first_index is None else self.first_index
        self.last_index = chunk.index
        return self.max_chunks is not None and self.chunks >= self.max_chunks

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()

    def stats(self, cursor: _StreamCursor) -> dict[str, Any]:
        gaps = [b - a for a, b in zip(self._arrivals, self._arrivals[1:])]
        return {
            "path": str(self.path),
            "chunks": self.chunks,
            "frames": self.frames,
            "bytes": self.bytes,
            "video_seconds": self.video_seconds,
            "first_index": self.first_index,
            "last_index": self.last_index,
            "time_to_first_chunk_seconds": (self._arrivals[0] - self._t0 if self._arrivals else None),
            "inter_chunk_p50_seconds": _percentile(gaps, 50),
            "inter_chunk_p99_seconds": _percentile(gaps, 99),
            "inter_chunk_max_seconds": max(gaps) if gaps else None,
            "wall_seconds": time.monotonic() - self._t0,
            "reconnects": cursor.reconnects,
            "end_of_stream": cursor.ended,
            "end_state": studio_pb2.Session.State.Name(cursor.end_state),
        }


class _ClientBase:
    _grpc: Any = grpc  # the channel factory module: grpc (blocking) or grpc.aio

    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        application: str | None = DEFAULT_APPLICATION,
        timeout_s: float | None = 30,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retries: int = 3,
        backoff_base_s: float = 0.1,
        backoff_max_s: float = 5.0,
        max_retry_after_s: float = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Mapping[str, Any] | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.target = target
        self.application = application
        self.timeout_s = timeout_s
        self.policy = RetryPolicy(retries, backoff_base_s, backoff_max_s, max_retry_after_s)
        self._metadata = _call_metadata(api_key, application)
        self._options = _channel_options(max_message_bytes, channel_options)
        if credentials is None:
            self._channel = self._grpc.insecure_channel(target, options=self._options)
        else:
            self._channel = self._grpc.secure_channel(target, credentials, options=self._options)
        self._stub = studio_pb2_grpc.StudioStub(self._channel)

    def __repr__(self) -> str:  # never shows the API key
        return f"{type(self).__name__}(target={self.target!r}, application={self.application!r})"

    def _cursor(self, session_id: str, resume_from_index: int, auto_resume: bool, max_reconnects: int) -> _StreamCursor:
        return _StreamCursor(
            session_id,
            resume_from_index,
            auto_resume=auto_resume,
            max_reconnects=max_reconnects,
            policy=self.policy,
        )


_CLIENT_DOC_KWARGS = """
    ``application``: Serve app name sent as ``application`` metadata (Ray Serve's gRPC proxy
    routes on it; default "fashionchameleon", None: not sent).
    ``timeout_s``: deadline of each unary attempt (streams have none). ``retries``: retries of
    a unary call after the first attempt. ``credentials``: TLS channel credentials (None:
    plaintext). ``channel_options``: extra gRPC channel arguments.
"""


# -- sync client -------------------------------------------------------------------------------


class StudioClient(_ClientBase):
    __doc__ = "Blocking Studio client (thread-safe; one HTTP/2 channel).\n" + _CLIENT_DOC_KWARGS

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _unary(self, method: Any, request: Any) -> Any:
        attempt = 0
        while True:
            try:
                return method(request, metadata=self._metadata, timeout=self.timeout_s)
            except grpc.RpcError as e:
                error = StudioError.from_rpc_error(e)
                delay = self.policy.unary_delay(error, attempt)
                if delay is None:
                    raise error from e
            attempt += 1
            time.sleep(delay)

    def create_session(
        self,
        reference: ImageLike,
        garment: ImageLike,
        prompt: str,
        *,
        seed: int | None = None,
        options: Mapping[str, Any] | common_pb2.SessionOptions | None = None,
        request_id: str | None = None,
    ) -> studio_pb2.Session:
        request = build_create_session_request(
            reference, garment, prompt, seed=seed, options=options, request_id=request_id
        )
        return self._unary(self._stub.CreateSession, request)

    def switch_garment(
        self,
        session_id: str,
        garment: ImageLike,
        *,
        options: Mapping[str, Any] | common_pb2.SwitchOptions | None = None,
        request_id: str | None = None,
    ) -> studio_pb2.SwitchGarmentResponse:
        request = build_switch_garment_request(session_id, garment, options=options, request_id=request_id)
        return self._unary(self._stub.SwitchGarment, request)

    def update_prompt(
        self, session_id: str, prompt: str, *, request_id: str | None = None
    ) -> studio_pb2.UpdatePromptResponse:
        request = build_update_prompt_request(session_id, prompt, request_id=request_id)
        return self._unary(self._stub.UpdatePrompt, request)

    def close_session(self, session_id: str) -> studio_pb2.CloseSessionResponse:
        request = studio_pb2.CloseSessionRequest(session_id=_session_id(session_id))
        return self._unary(self._stub.CloseSession, request)

    def get_session(self, session_id: str) -> studio_pb2.Session:
        request = studio_pb2.GetSessionRequest(session_id=_session_id(session_id))
        return self._unary(self._stub.GetSession, request)

    def stream(
        self,
        session_id: str,
        resume_from_index: int = 0,
        *,
        auto_resume: bool = True,
        max_reconnects: int = 5,
    ) -> Iterator[studio_pb2.VideoChunk]:
        """Chunks from ``resume_from_index`` on, in order, each index exactly once.

        Ends after the ``end_of_stream`` message (yielded; it may be a media-less marker).
        Close the iterator (or let it go) to cancel the RPC; the session stays open.
        """
        cursor = self._cursor(session_id, resume_from_index, auto_resume, max_reconnects)
        return self._stream(cursor)

    def _stream(self, cursor: _StreamCursor) -> Iterator[studio_pb2.VideoChunk]:
        while True:
            call = self._stub.StreamSession(cursor.request(), metadata=self._metadata)
            error: StudioError | None = None
            try:
                for chunk in call:
                    if cursor.accept(chunk):
                        yield chunk
                    if cursor.ended:
                        return
            except grpc.RpcError as e:
                error = StudioError.from_rpc_error(e)
            finally:
                call.cancel()
            delay = cursor.reconnect_delay(error)
            if delay is None:
                return
            time.sleep(delay)

    def save(
        self,
        session_id: str,
        path: str | Path,
        *,
        max_chunks: int | None = None,
        on_chunk: Callable[[studio_pb2.VideoChunk], Any] | None = None,
        resume_from_index: int = 0,
        auto_resume: bool = True,
        max_reconnects: int = 5,
    ) -> dict[str, Any]:
        """Stream into ``path`` as one playable fragmented MP4 until end_of_stream or
        ``max_chunks`` media chunks; returns timing stats (seconds, see ``_ChunkRecorder.stats``).
        ``on_chunk`` is called with every yielded chunk after it was written."""
        cursor = self._cursor(session_id, resume_from_index, auto_resume, max_reconnects)
        recorder = _ChunkRecorder(path, max_chunks)
        chunks = self._stream(cursor)
        try:
            for chunk in chunks:
                done = recorder.add(chunk)
                if on_chunk is not None:
                    on_chunk(chunk)
                if done:
                    break
        finally:
            chunks.close()
            recorder.close()
        return recorder.stats(cursor)


# -- asyncio client ----------------------------------------------------------------------------


class AsyncStudioClient(_ClientBase):
    __doc__ = "asyncio Studio client (``grpc.aio``); construct it inside a running event loop.\n" + _CLIENT_DOC_KWARGS
    _grpc = grpc.aio

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _unary(self, method: Any, request: Any) -> Any:
        attempt = 0
        while True:
            try:
                return await method(request, metadata=self._metadata, timeout=self.timeout_s)
            except grpc.RpcError as e:
                error = StudioError.from_rpc_error(e)
                delay = self.policy.unary_delay(error, attempt)
                if delay is None:
                    raise error from e
            attempt += 1
            await asyncio.sleep(delay)

    async def create_session(
        self,
        reference: ImageLike,
        garment: ImageLike,
        prompt: str,
        *,
        seed: int | None = None,
        options: Mapping[str, Any] | common_pb2.SessionOptions | None = None,
        request_id: str | None = None,
    ) -> studio_pb2.Session:
        request = build_create_session_request(
            reference, garment, prompt, seed=seed, options=options, request_id=request_id
        )
        return await self._unary(self._stub.CreateSession, request)

    async def switch_garment(
        self,
        session_id: str,
        garment: ImageLike,
        *,
        options: Mapping[str, Any] | common_pb2.SwitchOptions | None = None,
        request_id: str | None = None,
    ) -> studio_pb2.SwitchGarmentResponse:
        request = build_switch_garment_request(session_id, garment, options=options, request_id=request_id)
        return await self._unary(self._stub.SwitchGarment, request)

    async def update_prompt(
        self, session_id: str, prompt: str, *, request_id: str | None = None
    ) -> studio_pb2.UpdatePromptResponse:
        request = build_update_prompt_request(session_id, prompt, request_id=request_id)
        return await self._unary(self._stub.UpdatePrompt, request)

    async def close_session(self, session_id: str) -> studio_pb2.CloseSessionResponse:
        request = studio_pb2.CloseSessionRequest(session_id=_session_id(session_id))
        return await self._unary(self._stub.CloseSession, request)

    async def get_session(self, session_id: str) -> studio_pb2.Session:
        request = studio_pb2.GetSessionRequest(session_id=_session_id(session_id))
        return await self._unary(self._stub.GetSession, request)

    def stream(
        self,
        session_id: str,
        resume_from_index: int = 0,
        *,
        auto_resume: bool = True,
        max_reconnects: int = 5,
    ) -> AsyncIterator[studio_pb2.VideoChunk]:
        """``async for`` over the chunks; same semantics as :meth:`StudioClient.stream`.
        Use ``contextlib.aclosing`` to cancel the RPC promptly when breaking out early."""
        cursor = self._cursor(session_id, resume_from_index, auto_resume, max_reconnects)
        return self._stream(cursor)

    async def _stream(self, cursor: _StreamCursor) -> AsyncIterator[studio_pb2.VideoChunk]:
        while True:
            call = self._stub.StreamSession(cursor.request(), metadata=self._metadata)
            error: StudioError | None = None
            try:
                async for chunk in call:
                    if cursor.accept(chunk):
                        yield chunk
                    if cursor.ended:
                        return
            except grpc.RpcError as e:
                error = StudioError.from_rpc_error(e)
            finally:
                call.cancel()
            delay = cursor.reconnect_delay(error)
            if delay is None:
                return
            await asyncio.sleep(delay)

    async def save(
        self,
        session_id: str,
        path: str | Path,
        *,
        max_chunks: int | None = None,
        on_chunk: Callable[[studio_pb2.VideoChunk], Any] | None = None,
        resume_from_index: int = 0,
        auto_resume: bool = True,
        max_reconnects: int = 5,
    ) -> dict[str, Any]:
        """As :meth:`StudioClient.save`; ``on_chunk`` may be a plain or an async function."""
        cursor = self._cursor(session_id, resume_from_index, auto_resume, max_reconnects)
        recorder = _ChunkRecorder(path, max_chunks)
        chunks = self._stream(cursor)
        try:
            async for chunk in chunks:
                done = recorder.add(chunk)
                if on_chunk is not None:
                    result = on_chunk(chunk)
                    if inspect.isawaitable(result):
                        await result
                if done:
                    break
        finally:
            await chunks.aclose()
            recorder.close()
        return recorder.stats(cursor)
