"""The error model of the fashionchameleon.v1 API (see the header of common.proto).

Servicers raise a `ServiceError` subclass; the transport turns it into a gRPC status code, a
human message and a `grpc-status-details-bin` trailer holding a google.rpc.Status with one
google.rpc.ErrorInfo (reason, domain "fashionchameleon.v1", metadata) and, for retryable
conditions, a google.rpc.RetryInfo. Clients turn a `grpc.RpcError` back into the same
`ServiceError` subclass with `error_from_rpc_error` and branch on `code` and `reason` only.

Server side, in a plain grpcio servicer or a Ray Serve gRPC ingress deployment:

    @grpc_method(studio_pb2.Session)            # the response type returned on error (Ray)
    def GetSession(self, request, context):
        spec = ...                              # raise NotFound(..., reason="SESSION_NOT_FOUND")
        return session

or, without the decorator:

    def GetSession(self, request, context):
        with grpc_errors(context):
            return self._get_session(request)
        return studio_pb2.Session()             # reached only on a Ray context, status already set

On a `grpc.ServicerContext` the error aborts the RPC (an exception leaves the handler). A Ray
Serve `RayServegRPCContext` cannot abort: the code, details and trailer are set on it and the
handler returns an empty response, which Ray sends together with the status. Unexpected
exceptions become INTERNAL with a generic message and a reference id; the traceback is logged
under the same id, never sent.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar, NamedTuple

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from fashionchameleon.v1 import common_pb2

logger = logging.getLogger(__name__)

DOMAIN = "fashionchameleon.v1"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Every ErrorReason value name without its prefix, e.g. "SESSION_NOT_FOUND" (and "UNSPECIFIED").
REASONS = frozenset(name.removeprefix("ERROR_REASON_") for name in common_pb2.ErrorReason.keys())  # noqa: SIM118 (an enum wrapper, not a dict)
_MAX_DETAILS_CHARS = 1024  # status messages travel in an HTTP/2 header


class ServiceError(Exception):
    """An API error: a gRPC status code, an ErrorReason name and a message fit for clients.

    `reason` is an ErrorReason value name without "ERROR_REASON_" ("UNSPECIFIED" when no
    specific reason applies); `metadata` holds string key/values naming the offending thing
    ("field", "session_id", "limit", ...); `retry_after_s` (seconds) is sent as RetryInfo.
    Messages are English, for humans, and never contain secrets.
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        reason: str = "UNSPECIFIED",
        metadata: Mapping[str, Any] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown error reason {reason!r}; expected one of {sorted(REASONS)}")
        if retry_after_s is not None and not (math.isfinite(retry_after_s) and retry_after_s >= 0):
            raise ValueError(f"retry_after_s must be a finite number >= 0, got {retry_after_s!r}")
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, reason={self.reason!r}, "
            f"metadata={self.metadata!r}, retry_after_s={self.retry_after_s!r})"
        )


class InvalidArgument(ServiceError):
    """Malformed request: bad image, prompt, options, size, tensor or id."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(ServiceError):
    """Missing or unknown API key (Studio only)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    """The caller may not do this. Other tenants' sessions are NOT_FOUND instead (no leak)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(ServiceError):
    """Unknown session, catalog item, object or job."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    """A session id that is already open (internal services)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(ServiceError):
    """No capacity, tenant quota exceeded or message too large; set `retry_after_s` when retrying helps."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServiceError):
    """The session's state does not allow the call (closed, expired, switch before first chunk)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(ServiceError):
    """Resume index older than the retained chunks or past the end."""

    code = grpc.StatusCode.OUT_OF_RANGE


class Aborted(ServiceError):
    """The session moved or its replica was lost; the caller retries (the gateway rebuilds it)."""

    code = grpc.StatusCode.ABORTED


class Unavailable(ServiceError):
    """Transient: replica starting or draining; retry with backoff."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(ServiceError):
    """A bug or a model failure; the message stays generic."""

    code = grpc.StatusCode.INTERNAL


class Unknown(ServiceError):
    """Client side only: a status this API never sends on purpose (UNKNOWN, CANCELLED, ...)."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, status_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.code = status_code  # the instance keeps the code actually received


_BY_CODE: dict[grpc.StatusCode, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        AlreadyExists,
        ResourceExhausted,
        FailedPrecondition,
        OutOfRange,
        Aborted,
        Unavailable,
        DeadlineExceeded,
        Internal,
    )
}


class RpcStatus(NamedTuple):
    """A `grpc.Status` (what `ServicerContext.abort_with_status` takes)."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, bytes], ...]


grpc.Status.register(RpcStatus)


def to_status(err: ServiceError) -> RpcStatus:
    """`err` as (code, details, trailing_metadata) with the google.rpc.Status trailer."""
    details = _truncate(err.message)
    status = status_pb2.Status(code=err.code.value[0], message=details)
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata)
    status.details.add().Pack(info)
    if err.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(err.retry_after_s * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return RpcStatus(err.code, details, ((STATUS_DETAILS_KEY, status.SerializeToString()),))


def abort_context(context: Any, err: ServiceError) -> None:
    """Fail the current RPC with `err`.

    `grpc.ServicerContext` (sync grpcio): aborts, i.e. raises; the handler is left.
    Any other context with set_code / set_details / set_trailing_metadata (Ray Serve's
    `RayServegRPCContext`): sets them and returns; the handler must then return an (empty)
    response, which Ray sends together with the status.
    """
    status = to_status(err)
    if isinstance(context, grpc.ServicerContext):
        context.abort_with_status(status)  # raises
        raise AssertionError("unreachable: abort_with_status returned")
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(list(status.trailing_metadata))


def error_from_rpc_error(e: grpc.RpcError) -> ServiceError:
    """The `ServiceError` a client received: subclass from the status code, reason, metadata and
    retry delay from the `grpc-status-details-bin` trailer (reason "UNSPECIFIED" when absent,
    e.g. for transport failures)."""
    code = _call(e, "code") or grpc.StatusCode.UNKNOWN
    details = _call(e, "details") or ""
    reason, metadata, retry_after_s = "UNSPECIFIED", {}, None
    status = _status_from_trailers(_call(e, "trailing_metadata") or ())
    if status is not None:
        details = details or status.message
        for any_msg in status.details:
            if any_msg.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                any_msg.Unpack(info)
                if info.domain == DOMAIN and info.reason in REASONS:
                    reason, metadata = info.reason, dict(info.metadata)
            elif any_msg.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                any_msg.Unpack(retry)
                retry_after_s = max(0.0, retry.retry_delay.ToNanoseconds() / 1e9)
    cls = _BY_CODE.get(code)
    if cls is None:
        return Unknown(details, status_code=code, reason=reason, metadata=metadata, retry_after_s=retry_after_s)
    return cls(details, reason=reason, metadata=metadata, retry_after_s=retry_after_s)


def as_service_error(exc: BaseException) -> ServiceError:
    """`exc` itself if it is a ServiceError, else an INTERNAL error with a generic message.

    The traceback of an unexpected exception is logged with a reference id that the client
    also receives (message and metadata "error_ref"), so a report can be matched to the log.
    """
    if isinstance(exc, ServiceError):
        return exc
    ref = secrets.token_hex(6)
    logger.error("unexpected error in RPC handler (error_ref=%s)", ref, exc_info=exc)
    return Internal(f"internal error (ref {ref})", metadata={"error_ref": ref})


@contextlib.contextmanager
def grpc_errors(context: Any) -> Iterator[None]:
    """Turn exceptions raised inside the block into the RPC's status on `context`.

    On a `grpc.ServicerContext` the RPC is aborted (an exception leaves the block). On a Ray
    Serve context the status is set and the exception is swallowed: code after the block runs
    only in that case and must return an empty response.
    """
    try:
        yield
    except Exception as exc:
        if _already_failed(context):
            raise  # grpc's own abort signal, or a nested handler already set the status
        abort_context(context, as_service_error(exc))


def grpc_method(empty_response: Callable[[], Any] | None = None) -> Callable[[Callable], Callable]:
    """Decorator for servicer methods `(self, request_or_iterator, context)` of any shape:
    plain, `async def`, generator (server streaming) and async generator.

    Errors go through `grpc_errors` semantics. On a context that cannot abort (Ray Serve):
    a unary method returns `empty_response()`; a streaming method re-raises after setting the
    status, because Ray applies a streaming method's context only when a message is yielded
    and otherwise keeps just the code and details of a raised error (the trailer is lost there).
    On a `grpc.aio.ServicerContext` the async variants await `context.abort`.
    """

    def decorate(method: Callable) -> Callable:
        if inspect.isasyncgenfunction(method):

            @functools.wraps(method)
            async def async_stream(self: Any, request: Any, context: Any, *args: Any, **kwargs: Any):
                try:
                    async for message in method(self, request, context, *args, **kwargs):
                        yield message
                except Exception as exc:  # noqa: BLE001
                    await _fail_async(context, exc, streaming=True)

            return async_stream

        if inspect.iscoroutinefunction(method):

            @functools.wraps(method)
            async def async_unary(self: Any, request: Any, context: Any, *args: Any, **kwargs: Any):
                try:
                    return await method(self, request, context, *args, **kwargs)
                except Exception as exc:  # noqa: BLE001
                    await _fail_async(context, exc, streaming=False)
                    return _empty(empty_response, method)

            return async_unary

        if inspect.isgeneratorfunction(method):

            @functools.wraps(method)
            def sync_stream(self: Any, request: Any, context: Any, *args: Any, **kwargs: Any):
                try:
                    yield from method(self, request, context, *args, **kwargs)
                except Exception as exc:  # noqa: BLE001
                    _fail_sync(context, exc, streaming=True)

            return sync_stream

        @functools.wraps(method)
        def sync_unary(self: Any, request: Any, context: Any, *args: Any, **kwargs: Any):
            try:
                return method(self, request, context, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                _fail_sync(context, exc, streaming=False)
                return _empty(empty_response, method)

        return sync_unary

    return decorate


# ---- helpers -------------------------------------------------------------------------------


def _fail_sync(context: Any, exc: Exception, *, streaming: bool) -> None:
    if _already_failed(context):
        raise exc
    err = as_service_error(exc)
    abort_context(context, err)  # raises on grpc.ServicerContext
    if streaming:
        raise err from (None if err is exc else exc)


async def _fail_async(context: Any, exc: Exception, *, streaming: bool) -> None:
    if _already_failed(context):
        raise exc
    err = as_service_error(exc)
    if isinstance(context, grpc.aio.ServicerContext):
        status = to_status(err)
        await context.abort(status.code, status.details, status.trailing_metadata)  # raises
    abort_context(context, err)
    if streaming:
        raise err from (None if err is exc else exc)


def _empty(factory: Callable[[], Any] | None, method: Callable) -> Any:
    if factory is None:
        raise TypeError(f"{method.__qualname__}: grpc_method(empty_response) is needed on a non-aborting context")
    return factory()


def _already_failed(context: Any) -> bool:
    """True when the context already carries an error status (grpc's abort raises a bare
    Exception after setting it; it must pass through untouched)."""
    code_of = getattr(context, "code", None)
    if not callable(code_of):
        return False
    try:
        code = code_of()
    except (NotImplementedError, AttributeError):
        return False
    return isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK


def _status_from_trailers(trailers: Iterable[tuple[str, Any]]) -> status_pb2.Status | None:
    for key, value in trailers:
        if key.lower() == STATUS_DETAILS_KEY and isinstance(value, (bytes, bytearray)):
            status = status_pb2.Status()
            try:
                status.ParseFromString(bytes(value))
            except Exception:  # noqa: BLE001 - a garbled trailer is ignored, the code still counts
                return None
            return status
    return None


def _call(e: Any, name: str) -> Any:
    fn = getattr(e, name, None)
    return fn() if callable(fn) else None


def _truncate(message: str) -> str:
    return message if len(message) <= _MAX_DETAILS_CHARS else message[: _MAX_DETAILS_CHARS - 3] + "..."


def unwrap_remote(exc: BaseException) -> BaseException:
    """The original exception behind a Ray task error (a DeploymentHandle call re-raises the
    remote exception wrapped; its `cause` is what the remote code raised)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc
