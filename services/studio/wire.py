"""The Studio servicer's registration with request bytes that may not parse.

grpcio deserializes a request before any handler runs; when the bytes are not a valid message
the server answers UNKNOWN with the Python exception's text. `add_StudioServicer_to_server`
registers the generated handlers with a deserializer that never raises: undecodable bytes
become a `MalformedRequest`, which the Studio handlers answer with INVALID_ARGUMENT /
REQUEST_MALFORMED (after authentication, like any other request). It is the servicer function
Ray Serve's gRPC proxy is started with (`services.app.STUDIO_SERVICER`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fashionchameleon.v1 import studio_pb2_grpc
from services.common.errors import InvalidArgument


class MalformedRequest:
    """Stands in for request bytes that are not a `type_name` message (picklable: the Ray
    proxy ships it to the replica like a request)."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"MalformedRequest({self.type_name!r})"


def malformed_error(request: MalformedRequest) -> InvalidArgument:
    return InvalidArgument(
        f"the request is not a valid {request.type_name} message",
        reason="REQUEST_MALFORMED",
        metadata={"type": request.type_name},
    )


def _safe(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None
    owner = getattr(deserialize, "__self__", None)
    type_name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", None) or "request"

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # noqa: BLE001 - any parse failure is the client's malformed request
            return MalformedRequest(type_name)

    return parse


def _patched(handler: Any) -> Any:
    return handler._replace(request_deserializer=_safe(handler.request_deserializer))


class _SafeServer:
    """Passes the generated registration through, with parse-safe deserializers."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, generic_handlers: Any) -> None:
        for handler in generic_handlers:
            methods = getattr(handler, "_method_handlers", None)
            if isinstance(methods, dict):
                handler._method_handlers = {name: _patched(h) for name, h in methods.items()}
        self._server.add_generic_rpc_handlers(generic_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        add = getattr(self._server, "add_registered_method_handlers", None)
        if add is not None:
            add(service_name, {name: _patched(h) for name, h in method_handlers.items()})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def add_StudioServicer_to_server(servicer: Any, server: Any) -> None:
    studio_pb2_grpc.add_StudioServicer_to_server(servicer, _SafeServer(server))
