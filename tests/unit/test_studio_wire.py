"""Request bytes that do not parse (issue 14, item 10): a real grpcio server with the Studio
registration of services/studio/wire.py, and the Studio handlers' answer to them."""

from __future__ import annotations

import asyncio
from concurrent import futures
from unittest.mock import MagicMock

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from fashionchameleon.v1 import studio_pb2, studio_pb2_grpc
from services.common.errors import InvalidArgument, ServiceError, Unauthenticated, abort_context
from services.studio.auth import ApiKeyAuth
from services.studio.service import StudioService
from services.studio.wire import MalformedRequest, add_StudioServicer_to_server, malformed_error

GARBAGE = b"\xff\xff\xff\xff\x0f not a message"


class _Servicer(studio_pb2_grpc.StudioServicer):
    def GetSession(self, request, context):
        if isinstance(request, MalformedRequest):
            abort_context(context, malformed_error(request))
        return studio_pb2.Session(session_id=request.session_id)


@pytest.fixture()
def channel():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_StudioServicer_to_server(_Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    server.stop(0)


def _reason(err: grpc.RpcError) -> str:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            info = error_details_pb2.ErrorInfo()
            status_pb2.Status.FromString(value).details[0].Unpack(info)
            return info.reason
    return ""


def test_garbage_bytes_reach_the_handler_as_a_malformed_request(channel):
    raw = channel.unary_unary("/fashionchameleon.v1.Studio/GetSession")
    with pytest.raises(grpc.RpcError) as err:
        raw(GARBAGE, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # was UNKNOWN + the parser's exception text
    assert _reason(err.value) == "REQUEST_MALFORMED"
    assert "Error" not in err.value.details() and "Wire format" not in err.value.details()
    ok = studio_pb2_grpc.StudioStub(channel).GetSession(studio_pb2.GetSessionRequest(session_id="ses_x"), timeout=10)
    assert ok.session_id == "ses_x"  # good bytes parse as before


def _studio() -> StudioService:
    studio = object.__new__(StudioService)
    studio.auth = ApiKeyAuth({"key-acme-0123456789": "acme"})
    studio.metrics = MagicMock()
    return studio


@pytest.mark.parametrize(
    "method",
    [
        "CreateSession",
        "GetSession",
        "SwitchGarment",
        "UpdatePrompt",
        "CloseSession",
        "SubmitClips",
        "GetJob",
        "ListJobs",
        "CancelJob",
    ],
)
def test_studio_unary_handlers_answer_invalid_argument_after_auth(method):
    studio, bad = _studio(), MalformedRequest("fashionchameleon.v1.X")
    call = getattr(studio, method)
    with pytest.raises(InvalidArgument) as err:
        asyncio.run(call(bad, None, [("authorization", "Bearer key-acme-0123456789")]))
    assert err.value.reason == "REQUEST_MALFORMED"
    with pytest.raises(Unauthenticated) as err:
        asyncio.run(call(bad, None, []))
    assert err.value.reason == "API_KEY_INVALID"


@pytest.mark.parametrize("method", ["StreamSession", "WatchJobs"])
def test_studio_streaming_handlers_answer_invalid_argument(method):
    studio, bad = _studio(), MalformedRequest("fashionchameleon.v1.X")

    async def drain():
        async for _ in getattr(studio, method)(bad, None, [("x-api-key", "key-acme-0123456789")]):
            pass

    with pytest.raises(ServiceError) as err:
        asyncio.run(drain())
    assert isinstance(err.value, InvalidArgument) and err.value.reason == "REQUEST_MALFORMED"


def test_malformed_requests_pickle():
    import pickle

    assert pickle.loads(pickle.dumps(MalformedRequest("t"))).type_name == "t"  # the Ray proxy ships it
