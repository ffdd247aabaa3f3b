"""The Studio's HTTP side (Ray Serve's HTTP proxy, beside the gRPC port): probes, the reference
player page and a session's browser WebSocket, authorised by viewer tokens
(Studio.CreateViewerToken, services/studio/viewer.py). `build_http_app(studio)` makes the
Starlette app around one `StudioService`; Ray Serve runs it as the deployment's ASGI ingress
(`serve.ingress()` in services/app.py), while the same replica keeps answering gRPC.

Routes (a viewer token travels in the `token` query parameter: browsers cannot set headers
on a WebSocket):

    GET  /healthz, /readyz                          liveness / readiness (JSON; 503 = not)
    GET  /player?session=ID&token=T                 the reference player page (player.html)
    GET  /player?launch=L                           the same, opening a dev session first (below)
    GET  /v1/sessions/{id}/catalog?token=T          garments the token may switch to (JSON)
    GET  /v1/sessions/{id}/catalog/{garment}/image?token=T   a catalog garment's image
    WS   /v1/sessions/{id}/ws?token=T&from_chunk=N  the session's video and controls
    POST /v1/player/sessions {"launch_token": L}    a new session of the launch token's tenant
                                                    and a viewer token for it (dev only)

The catalog routes need a token that allows switch_garment (PERMISSION_DENIED otherwise); the
list holds the tenant's own garments, then the shared ones whose id the tenant does not use
(a tenant's own item shadows a shared one with the same id, as in SwitchGarment).

WebSocket protocol. The server sends, in this order:
  * {"type": "hello", "session_id", "actions", "expires_at" (unix s), "from_chunk"};
  * per chunk, a text event {"type": "chunk", "index", "garment_id", "switch_applied",
    "prompt_revision", "prompt_update_applied", "num_frames", "start_seconds",
    "duration_seconds", "fps", "width", "height", "init_included", "mime_type",
    "generation_latency_seconds", "generated_at", "bytes"} immediately followed by one binary
    message: the chunk's fMP4 bytes, exactly StreamSession's VideoChunk.fmp4 (the first one of
    a connection starts with the init segment). Chunks come in index order from `from_chunk`
    (default 0), each once: reconnecting with from_chunk = last index + 1 continues without
    a gap or a repeat;
  * {"type": "end", "index", "state"} when the session ended (then the socket closes, 1000).
The client may send text messages:
    {"type": "switch_garment", "garment": {"catalog_id": "..."} | {"image_b64": "..."}, "request_id": "..."}
    {"type": "update_prompt", "prompt": "...", "request_id": "..."}
each answered by {"type": "ack", "action", "request_id", "effective_chunk_index", and
"garment_id" or "prompt_revision"} once the change is scheduled (as SwitchGarment /
UpdatePrompt answer), or by an error. request_id is optional and, as in gRPC, makes a retry
(after a reconnect) return the first answer instead of switching twice.
Errors are {"type": "error", "code", "reason", "message", "metadata", "request_id"}: `code` the
gRPC status name, `reason` the ErrorReason name and `metadata` the ErrorInfo metadata, exactly as
the gRPC API reports them (metadata and request_id only when there are any). A refused token or
resume point closes the socket with 4000 + the HTTP status (4401 UNAUTHENTICATED, 4403
PERMISSION_DENIED, 4404 NOT_FOUND, 4400 INVALID_ARGUMENT / OUT_OF_RANGE); a control message's
error leaves the socket open unless the token is no longer valid. The socket also closes
(4401) when the token expires.

HTTP errors are JSON {"error": {"code", "reason", "message"}} with the HTTP status of the code.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from fashionchameleon.v1 import common_pb2, studio_pb2
from services.common.errors import (
    InvalidArgument,
    NotFound,
    ServiceError,
    as_service_error,
    unwrap_remote,
)
from services.studio.viewer import SWITCH_GARMENT, UPDATE_PROMPT, WATCH, player_path
from shared.storage import ObjectNotFound, sniff_image_type

log = logging.getLogger(__name__)

HTTP_STATUS = {  # gRPC status -> HTTP status (google.rpc.Code's documented mapping)
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
NORMAL_CLOSE = 1000
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # the page's URL holds the token
    "X-Content-Type-Options": "nosniff",
}


def http_status(err: ServiceError) -> int:
    return HTTP_STATUS.get(err.code.name, 500)


def close_code(err: ServiceError) -> int:
    """The WebSocket close code of an error that ends a connection: 4000 + its HTTP status."""
    return 4000 + http_status(err)


def error_body(err: ServiceError, request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "error", "code": err.code.name, "reason": err.reason, "message": err.message}
    if err.metadata:
        body["metadata"] = err.metadata
    if request_id is not None:
        body["request_id"] = request_id
    return body


def _service_error(exc: BaseException) -> ServiceError:
    err = as_service_error(unwrap_remote(exc))
    if not isinstance(unwrap_remote(exc), ServiceError):
        log.exception("studio HTTP call failed")
    return err


def _error_response(err: ServiceError) -> JSONResponse:
    body = {k: v for k, v in error_body(err).items() if k != "type"}
    return JSONResponse({"error": body}, status_code=http_status(err), headers=_SECURITY_HEADERS)


def chunk_event(chunk: studio_pb2.VideoChunk) -> dict[str, Any]:
    """The JSON event that precedes a chunk's binary message."""
    return {
        "type": "chunk",
        "index": chunk.index,
        "garment_id": chunk.garment_id,
        "switch_applied": chunk.switch_applied,
        "prompt_revision": chunk.prompt_revision,
        "prompt_update_applied": chunk.prompt_update_applied,
        "num_frames": chunk.num_frames,
        "start_seconds": chunk.start_seconds,
        "duration_seconds": chunk.duration_seconds,
        "fps": chunk.fps,
        "width": chunk.width,
        "height": chunk.height,
        "init_included": chunk.is_init_segment_included,
        "mime_type": chunk.mime_type,
        "generation_latency_seconds": chunk.generation_latency_seconds,
        "generated_at": chunk.generated_at.ToNanoseconds() / 1e9 if chunk.HasField("generated_at") else None,
        "bytes": len(chunk.fmp4),
    }


def player_html() -> str:
    return resources.files("services.studio").joinpath("player.html").read_text(encoding="utf-8")


def _garment_input(garment: Any) -> common_pb2.ImageInput:
    """The `garment` of a switch_garment message as an ImageInput (catalog id or uploaded bytes)."""
    if not isinstance(garment, dict) or len(garment) != 1:
        raise InvalidArgument(
            "garment: needs exactly one of catalog_id or image_b64",
            reason="FIELD_INVALID",
            metadata={"field": "garment"},
        )
    if isinstance(garment.get("catalog_id"), str):
        return common_pb2.ImageInput(catalog_id=garment["catalog_id"])
    if isinstance(garment.get("image_b64"), str):
        try:
            data = base64.b64decode(garment["image_b64"], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument(
                "garment.image_b64: not valid base64", reason="FIELD_INVALID", metadata={"field": "garment.image_b64"}
            ) from None
        return common_pb2.ImageInput(data=data)
    raise InvalidArgument(
        "garment: needs exactly one of catalog_id or image_b64 (a string)",
        reason="FIELD_INVALID",
        metadata={"field": "garment"},
    )


def _request_id(message: dict) -> str | None:
    rid = message.get("request_id")
    if rid is None or isinstance(rid, str):
        return rid
    raise InvalidArgument("request_id: must be a string", reason="FIELD_INVALID", metadata={"field": "request_id"})


def _from_chunk(raw: str | None) -> int:
    if raw is None or raw == "":
        return 0
    if not raw.isdigit() or len(raw) > 18:
        raise InvalidArgument(
            "from_chunk: must be a chunk index >= 0", reason="FIELD_INVALID", metadata={"field": "from_chunk"}
        )
    return int(raw)


class _Viewer:
    """One WebSocket connection: the chunk stream, the control messages and the token's expiry."""

    def __init__(self, studio: Any, websocket: WebSocket, session_id: str, token: str) -> None:
        self.studio = studio
        self.ws = websocket
        self.session_id = session_id
        self.token = token
        self.send_lock = asyncio.Lock()  # a chunk's event and its bytes go out back to back
        self.closed = False
        self.controls: set[asyncio.Task] = set()

    async def send_json(self, body: dict) -> None:
        async with self.send_lock:
            if not self.closed:
                await self.ws.send_text(json.dumps(body))

    async def close(self, code: int, err: ServiceError | None = None) -> None:
        async with self.send_lock:
            if self.closed:
                return
            self.closed = True
            with contextlib.suppress(Exception):
                if err is not None:
                    await self.ws.send_text(json.dumps(error_body(err)))
                await self.ws.close(code)

    async def run(self) -> None:
        viewers = self.studio._viewer_tokens()
        try:
            resume = _from_chunk(self.ws.query_params.get("from_chunk"))
            grant = await viewers.check(self.session_id, self.token, WATCH)
            record = await self.studio._session_for(self.session_id, grant.tenant)
        except Exception as exc:  # noqa: BLE001 - every refusal is reported the same way
            err = _service_error(exc)
            await self.close(close_code(err), err)
            return
        self.grant = grant
        await self.send_json(
            {
                "type": "hello",
                "session_id": self.session_id,
                "actions": list(grant.actions),
                "expires_at": grant.expires_at,
                "from_chunk": resume,
            }
        )
        tasks = [
            asyncio.create_task(self._stream(record, resume)),
            asyncio.create_task(self._receive()),
            asyncio.create_task(self._expire(grant.expires_at)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [*tasks, *self.controls]:
                task.cancel()
            await asyncio.gather(*tasks, *self.controls, return_exceptions=True)
            await self.close(NORMAL_CLOSE)

    async def _stream(self, record: Any, resume: int) -> None:
        try:
            async for chunk in self.studio.stream_chunks(record, resume):
                if chunk.end_of_stream:
                    end = {"type": "end", "index": chunk.index, "state": studio_pb2.Session.State.Name(chunk.end_state)}
                    await self.send_json(end)
                    await self.close(NORMAL_CLOSE)
                    return
                async with self.send_lock:
                    if self.closed:
                        return
                    await self.ws.send_text(json.dumps(chunk_event(chunk)))
                    await self.ws.send_bytes(chunk.fmp4)
        except (WebSocketDisconnect, RuntimeError, OSError):
            return  # the client went away
        except Exception as exc:  # noqa: BLE001 - reported to the client, then the socket closes
            err = _service_error(exc)
            await self.close(close_code(err), err)

    async def _receive(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await self.send_json(
                    error_body(
                        InvalidArgument(
                            "send control messages as JSON text", reason="REQUEST_MALFORMED", metadata={"type": "json"}
                        )
                    )
                )
                continue
            task = asyncio.create_task(self._control(text))
            self.controls.add(task)
            task.add_done_callback(self.controls.discard)

    async def _expire(self, expires_at: float) -> None:
        await asyncio.sleep(max(0.0, expires_at - time.time()))
        while True:  # the token's own record decides (a clock skew never ends a valid token early)
            try:
                await self.studio._viewer_tokens().check(self.session_id, self.token, WATCH)
            except ServiceError as err:
                await self.close(close_code(err), err)
                return
            await asyncio.sleep(1.0)

    async def _control(self, text: str) -> None:
        request_id = None
        try:
            try:
                message = json.loads(text)
            except ValueError:
                message = None
            if not isinstance(message, dict):
                raise InvalidArgument(
                    "a control message is a JSON object", reason="REQUEST_MALFORMED", metadata={"type": "json"}
                )
            request_id = _request_id(message)
            kind = message.get("type")
            if kind == "switch_garment":
                await self.send_json(await self._switch(message, request_id))
            elif kind == "update_prompt":
                await self.send_json(await self._prompt(message, request_id))
            else:
                raise InvalidArgument(
                    "type: must be switch_garment or update_prompt", reason="FIELD_INVALID", metadata={"field": "type"}
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered on the socket
            err = _service_error(exc)
            if err.reason == "VIEWER_TOKEN_INVALID":
                await self.send_json(error_body(err, request_id))
                await self.close(close_code(err))
            else:
                await self.send_json(error_body(err, request_id))

    async def _switch(self, message: dict, request_id: str | None) -> dict:
        grant = await self.studio._viewer_tokens().check(self.session_id, self.token, SWITCH_GARMENT)
        request = studio_pb2.SwitchGarmentRequest(
            session_id=self.session_id, garment=_garment_input(message.get("garment")), request_id=request_id or ""
        )
        response = await self.studio._unary(
            None,
            "SwitchGarment",
            studio_pb2.SwitchGarmentResponse,
            lambda: self.studio.switch_garment(grant.tenant, request),
        )
        return {
            "type": "ack",
            "action": SWITCH_GARMENT,
            "request_id": request_id,
            "effective_chunk_index": response.effective_chunk_index,
            "garment_id": response.garment_id,
        }

    async def _prompt(self, message: dict, request_id: str | None) -> dict:
        grant = await self.studio._viewer_tokens().check(self.session_id, self.token, UPDATE_PROMPT)
        prompt = message.get("prompt")
        if not isinstance(prompt, str):
            raise InvalidArgument("prompt: must be a string", reason="PROMPT_INVALID", metadata={"field": "prompt"})
        request = studio_pb2.UpdatePromptRequest(session_id=self.session_id, prompt=prompt, request_id=request_id or "")
        response = await self.studio._unary(
            None,
            "UpdatePrompt",
            studio_pb2.UpdatePromptResponse,
            lambda: self.studio.update_prompt(grant.tenant, request),
        )
        return {
            "type": "ack",
            "action": UPDATE_PROMPT,
            "request_id": request_id,
            "effective_chunk_index": response.effective_chunk_index,
            "prompt_revision": response.prompt_revision,
        }


def build_http_app(studio: Any) -> Starlette:
    """The Starlette app of one Studio replica (`studio`: a `StudioService`)."""

    async def healthz(request: Request) -> Response:
        probe = studio.health.liveness()
        return JSONResponse(probe.body, status_code=probe.status_code)

    async def readyz(request: Request) -> Response:
        probe = studio.health.readiness()
        return JSONResponse(probe.body, status_code=probe.status_code)

    async def player(request: Request) -> Response:
        return HTMLResponse(player_html(), headers=_SECURITY_HEADERS)

    async def _catalog_grant(request: Request):
        session_id = request.path_params["session_id"]
        grant = await studio._viewer_tokens().check(session_id, request.query_params.get("token", ""), SWITCH_GARMENT)
        return session_id, grant

    async def catalog(request: Request) -> Response:
        try:
            session_id, grant = await _catalog_grant(request)
            record = await studio._session_for(session_id, grant.tenant)
            garments: dict[str, dict] = {}
            for owner in (grant.tenant, "public"):  # the tenant's own items shadow shared ones
                entries = await asyncio.to_thread(lambda o=owner: list(studio.catalog.list(o)))
                for entry in sorted(entries, key=lambda e: e.garment_id):
                    garments.setdefault(
                        entry.garment_id,
                        {
                            "catalog_id": entry.garment_id,
                            "owner": "tenant" if owner == grant.tenant else "public",
                            "image_path": f"/v1/sessions/{session_id}/catalog/{entry.garment_id}/image",
                        },
                    )
        except Exception as exc:  # noqa: BLE001
            return _error_response(_service_error(exc))
        body = {"garments": list(garments.values()), "garment_id": str(record.meta.get("garment_id", ""))}
        return JSONResponse(body, headers=_SECURITY_HEADERS)

    async def catalog_image(request: Request) -> Response:
        try:
            _, grant = await _catalog_grant(request)
            garment_id = request.path_params["garment_id"]
            owner = await studio.catalog_owner(garment_id, grant.tenant)  # the lookup SwitchGarment uses
            try:
                data = await asyncio.to_thread(
                    studio.catalog.get, garment_id, tenant=owner, max_bytes=studio.limits.max_image_bytes
                )
            except (ObjectNotFound, ValueError):  # gone since, or over the image limit
                raise NotFound(
                    "catalog garment not found", reason="CATALOG_ITEM_NOT_FOUND", metadata={"catalog_id": garment_id}
                ) from None
            content_type = sniff_image_type(data)
        except Exception as exc:  # noqa: BLE001
            return _error_response(_service_error(exc))
        return Response(
            data, media_type=content_type, headers={**_SECURITY_HEADERS, "Cache-Control": "private, max-age=300"}
        )

    async def launch(request: Request) -> Response:
        if not studio.config.viewer.dev_launch:
            return _error_response(NotFound("not found"))
        try:
            try:
                body = await request.json()
            except ValueError:
                body = None
            token = body.get("launch_token") if isinstance(body, dict) else None
            viewers = studio._viewer_tokens()
            grant = await viewers.check_launch(token if isinstance(token, str) else "")
            create = studio_pb2.CreateSessionRequest(
                reference=common_pb2.ImageInput(object_key=grant.reference_key),
                garment=common_pb2.ImageInput(catalog_id=grant.garment_id),
                prompt=grant.prompt,
            )
            session = await studio._unary(
                None, "CreateSession", studio_pb2.Session, lambda: studio._create_session(grant.tenant, create)
            )
            viewer_token, viewer = await viewers.mint(
                grant.tenant,
                session.session_id,
                (WATCH, SWITCH_GARMENT, UPDATE_PROMPT),
                studio.config.viewer.default_ttl_s,
            )
        except Exception as exc:  # noqa: BLE001
            return _error_response(_service_error(exc))
        return JSONResponse(
            {
                "session_id": session.session_id,
                "token": viewer_token,
                "expires_at": viewer.expires_at,
                "actions": list(viewer.actions),
                "player_path": player_path(session.session_id, viewer_token),
            },
            headers=_SECURITY_HEADERS,
        )

    async def session_ws(websocket: WebSocket) -> None:
        await websocket.accept()
        viewer = _Viewer(
            studio, websocket, websocket.path_params["session_id"], websocket.query_params.get("token", "")
        )
        await viewer.run()

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/player", player),
            Route("/v1/sessions/{session_id}/catalog", catalog),
            Route("/v1/sessions/{session_id}/catalog/{garment_id}/image", catalog_image),
            Route("/v1/player/sessions", launch, methods=["POST"]),
            WebSocketRoute("/v1/sessions/{session_id}/ws", session_ws),
        ]
    )
