"""The service edge: error model on the wire, tensor wire format, API-key auth, Studio request
validation.

Errors are checked end to end: a real in-process gRPC server on 127.0.0.1 raises through
`grpc_method` / `grpc_errors` (plain grpcio, grpc.aio and a Ray-Serve-style context applied the
way Ray's proxy applies it), and a real client parses the status back with
`error_from_rpc_error`.
"""

from __future__ import annotations

import asyncio
import io
import logging
import struct
import warnings
import zlib
from concurrent import futures

import grpc
import pytest
import torch
from google.rpc import error_details_pb2, status_pb2
from PIL import Image
from pydantic import ValidationError

from fashionchameleon.v1 import common_pb2, studio_pb2, studio_pb2_grpc
from services.common.errors import (
    DOMAIN,
    REASONS,
    STATUS_DETAILS_KEY,
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
    Unknown,
    abort_context,
    error_from_rpc_error,
    grpc_errors,
    grpc_method,
    to_status,
)
from services.common.tensors import (
    pad_text_embedding,
    tensor_from_proto,
    tensor_to_proto,
    trim_text_embedding,
)
from services.common.validation import ImageRef, Limits
from services.studio.auth import ApiKeyAuth, key_digest
from services.studio.validation import (
    SwitchOptionsSpec,
    new_session_id,
    parse_create_session,
    parse_request_id,
    parse_stream_session,
    parse_switch_garment,
    parse_update_prompt,
    validate_session_id,
)

pytestmark = pytest.mark.timeout(120)

# ---- errors on the wire --------------------------------------------------------------------

# (class, expected status code, reason, metadata, retry_after_s)
ERROR_CASES = [
    (
        InvalidArgument,
        grpc.StatusCode.INVALID_ARGUMENT,
        "IMAGE_TOO_LARGE",
        {"field": "garment.data", "limit": "20"},
        None,
    ),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, "UNSPECIFIED", {}, None),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, "UNSPECIFIED", {"catalog_id": "sku-1"}, None),
    (NotFound, grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND", {"session_id": "ses_x"}, None),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS, "UNSPECIFIED", {"session_id": "ses_x"}, None),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED", {}, 2.5),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED", {"quota": "sessions"}, 10.0),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, "SESSION_NOT_ACTIVE", {"state": "CLOSED"}, None),
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE, "CHUNK_NOT_RETAINED", {"oldest_available_index": "17"}, None),
    (Aborted, grpc.StatusCode.ABORTED, "SESSION_NOT_ON_REPLICA", {}, 0.0),
    (Unavailable, grpc.StatusCode.UNAVAILABLE, "UNSPECIFIED", {}, 0.25),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, "UNSPECIFIED", {}, None),
    (Internal, grpc.StatusCode.INTERNAL, "UNSPECIFIED", {}, None),
]
CASE_IDS = [f"{c[0].__name__}-{c[2]}" for c in ERROR_CASES]


def _ray_context_class():
    with warnings.catch_warnings():  # importing ray.serve emits pydantic deprecation warnings
        warnings.simplefilter("ignore")
        from ray.serve.grpc_util import RayServegRPCContext
    return RayServegRPCContext


def _make_error(i: int) -> ServiceError:
    cls, _, reason, metadata, retry = ERROR_CASES[i]
    return cls(f"case {i} failed: {cls.__name__}", reason=reason, metadata=metadata, retry_after_s=retry)


class _RayStyle:
    """Handlers written for Ray Serve: they get a RayServegRPCContext, never abort."""

    @grpc_method(studio_pb2.UpdatePromptResponse)
    def UpdatePrompt(self, request, context):
        raise _make_error(int(request.session_id))

    def CloseSession(self, request, context):
        with grpc_errors(context):
            raise _make_error(int(request.session_id))
        return studio_pb2.CloseSessionResponse()


class _Studio(studio_pb2_grpc.StudioServicer):
    """Plain grpcio handlers; UpdatePrompt / CloseSession go through a RayServegRPCContext the
    way Ray's proxy does it (build from the grpc context, call, copy back, return)."""

    def __init__(self) -> None:
        self.ray = _RayStyle()

    @grpc_method(studio_pb2.Session)
    def GetSession(self, request, context):
        if request.session_id == "boom":
            raise RuntimeError("secret internal detail /etc/passwd")
        if request.session_id == "ok":
            return studio_pb2.Session(session_id="ok")
        raise _make_error(int(request.session_id))

    def SwitchGarment(self, request, context):
        with grpc_errors(context):
            raise _make_error(int(request.session_id))
        raise AssertionError("unreachable on a grpc.ServicerContext")

    @grpc_method()
    def StreamSession(self, request, context):
        for i in range(2):
            yield studio_pb2.VideoChunk(index=i)
        raise OutOfRange("gone", reason="CHUNK_NOT_RETAINED", metadata={"oldest_available_index": 5})

    def UpdatePrompt(self, request, context):
        return self._via_ray(self.ray.UpdatePrompt, request, context)

    def CloseSession(self, request, context):
        return self._via_ray(self.ray.CloseSession, request, context)

    @staticmethod
    def _via_ray(handler, request, context):
        context.set_trailing_metadata(())  # Ray's proxy context (grpc.aio) starts with (), sync with None
        ray_context = _ray_context_class()(context)
        response = handler(request, ray_context)
        ray_context._set_on_grpc_context(context)
        return response


@pytest.fixture(scope="module")
def studio_stub():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    studio_pb2_grpc.add_StudioServicer_to_server(_Studio(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield studio_pb2_grpc.StudioStub(channel)
    finally:
        channel.close()
        server.stop(None)


def _rpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=10)
    return info.value


def _check_received(err: ServiceError, i: int) -> None:
    cls, code, reason, metadata, retry = ERROR_CASES[i]
    assert type(err) is cls
    assert err.code == code
    assert err.reason == reason
    assert err.metadata == metadata
    assert err.retry_after_s == retry
    assert err.message == f"case {i} failed: {cls.__name__}"


@pytest.mark.parametrize("i", range(len(ERROR_CASES)), ids=CASE_IDS)
def test_error_codes_and_trailer_reach_a_real_client(studio_stub, i: int) -> None:
    e = _rpc_error(studio_stub.GetSession, studio_pb2.GetSessionRequest(session_id=str(i)))
    assert e.code() == ERROR_CASES[i][1]
    assert e.details() == f"case {i} failed: {ERROR_CASES[i][0].__name__}"
    _check_received(error_from_rpc_error(e), i)


@pytest.mark.parametrize("i", [0, 3, 5], ids=[CASE_IDS[0], CASE_IDS[3], CASE_IDS[5]])
def test_context_manager_form_on_grpc_context(studio_stub, i: int) -> None:
    e = _rpc_error(studio_stub.SwitchGarment, studio_pb2.SwitchGarmentRequest(session_id=str(i)))
    _check_received(error_from_rpc_error(e), i)


@pytest.mark.parametrize("i", [0, 5, 8], ids=[CASE_IDS[0], CASE_IDS[5], CASE_IDS[8]])
def test_ray_serve_context_decorator_and_context_manager(studio_stub, i: int) -> None:
    for call, request in (
        (studio_stub.UpdatePrompt, studio_pb2.UpdatePromptRequest(session_id=str(i))),
        (studio_stub.CloseSession, studio_pb2.CloseSessionRequest(session_id=str(i))),
    ):
        e = _rpc_error(call, request)
        assert e.code() == ERROR_CASES[i][1]
        _check_received(error_from_rpc_error(e), i)


def test_unexpected_exception_is_internal_without_leaking(studio_stub, caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="services.common.errors"):
        e = _rpc_error(studio_stub.GetSession, studio_pb2.GetSessionRequest(session_id="boom"))
    err = error_from_rpc_error(e)
    assert e.code() == grpc.StatusCode.INTERNAL and isinstance(err, Internal)
    assert "secret" not in e.details() and "passwd" not in e.details()
    ref = err.metadata["error_ref"]
    assert ref in e.details()
    logged = [r for r in caplog.records if ref in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback is in the log, not on the wire


def test_success_passes_through(studio_stub) -> None:
    assert studio_stub.GetSession(studio_pb2.GetSessionRequest(session_id="ok"), timeout=10).session_id == "ok"


def test_stream_error_after_messages_keeps_the_messages_and_the_trailer(studio_stub) -> None:
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for chunk in studio_stub.StreamSession(studio_pb2.StreamSessionRequest(session_id="x"), timeout=10):
            received.append(chunk.index)
    assert received == [0, 1]
    err = error_from_rpc_error(info.value)
    assert isinstance(err, OutOfRange) and err.reason == "CHUNK_NOT_RETAINED"
    assert err.metadata == {"oldest_available_index": "5"}


def test_unimplemented_method_becomes_unknown_with_the_code(studio_stub) -> None:
    e = _rpc_error(studio_stub.CreateSession, studio_pb2.CreateSessionRequest())
    err = error_from_rpc_error(e)
    assert isinstance(err, Unknown) and err.code == grpc.StatusCode.UNIMPLEMENTED and err.reason == "UNSPECIFIED"


def test_grpc_aio_server_async_methods() -> None:
    class AioStudio(studio_pb2_grpc.StudioServicer):
        @grpc_method(studio_pb2.Session)
        async def GetSession(self, request, context):
            raise _make_error(int(request.session_id))

        @grpc_method()
        async def StreamSession(self, request, context):
            yield studio_pb2.VideoChunk(index=0)
            raise Aborted("moved", reason="SESSION_NOT_ON_REPLICA", retry_after_s=0.5)

    async def main():
        server = grpc.aio.server()
        studio_pb2_grpc.add_StudioServicer_to_server(AioStudio(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = studio_pb2_grpc.StudioStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as unary:
                    await stub.GetSession(studio_pb2.GetSessionRequest(session_id="5"), timeout=10)
                got = []
                with pytest.raises(grpc.aio.AioRpcError) as stream:
                    async for chunk in stub.StreamSession(studio_pb2.StreamSessionRequest(), timeout=10):
                        got.append(chunk.index)
                return unary.value, stream.value, got
        finally:
            await server.stop(None)

    unary, stream, got = asyncio.run(main())
    _check_received(error_from_rpc_error(unary), 5)
    err = error_from_rpc_error(stream)
    assert got == [0]
    assert isinstance(err, Aborted) and err.reason == "SESSION_NOT_ON_REPLICA" and err.retry_after_s == 0.5


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code, details, trailers):
        self._code, self._details, self._trailers = code, details, trailers

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


def test_to_status_builds_the_documented_trailer() -> None:
    code, details, trailers = to_status(
        ResourceExhausted("no GPU memory", reason="CAPACITY_EXHAUSTED", metadata={"limit": 3}, retry_after_s=1.5)
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details == "no GPU memory"
    [(key, value)] = trailers
    assert key == STATUS_DETAILS_KEY and isinstance(value, bytes)
    status = status_pb2.Status.FromString(value)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and status.message == "no GPU memory"
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and status.details[1].Unpack(retry)
    assert (info.reason, info.domain, dict(info.metadata)) == ("CAPACITY_EXHAUSTED", DOMAIN, {"limit": "3"})
    assert retry.retry_delay.seconds == 1 and retry.retry_delay.nanos == 500_000_000


def test_error_reasons_follow_common_proto() -> None:
    assert "SESSION_NOT_FOUND" in REASONS and "UNSPECIFIED" in REASONS
    assert len(REASONS) == len(common_pb2.ErrorReason.keys())
    with pytest.raises(ValueError, match="unknown error reason"):
        NotFound("x", reason="ERROR_REASON_SESSION_NOT_FOUND")  # the prefix is not part of the reason
    with pytest.raises(ValueError):
        Unavailable("x", retry_after_s=-1.0)


def test_client_parsing_without_or_with_garbled_trailer() -> None:
    err = error_from_rpc_error(_FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused", ()))
    assert isinstance(err, Unavailable) and err.reason == "UNSPECIFIED" and err.retry_after_s is None
    err = error_from_rpc_error(_FakeRpcError(grpc.StatusCode.NOT_FOUND, "x", ((STATUS_DETAILS_KEY, b"\xff\xff"),)))
    assert isinstance(err, NotFound) and err.reason == "UNSPECIFIED"
    # an ErrorInfo of another domain is not ours to interpret
    status = status_pb2.Status(code=5, message="x")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="SESSION_NOT_FOUND", domain="other.example"))
    err = error_from_rpc_error(
        _FakeRpcError(grpc.StatusCode.NOT_FOUND, "x", ((STATUS_DETAILS_KEY, status.SerializeToString()),))
    )
    assert err.reason == "UNSPECIFIED"


def test_abort_context_on_a_ray_context_sets_everything() -> None:
    class Ctx:
        def set_code(self, code):
            self.code_ = code

        def set_details(self, details):
            self.details_ = details

        def set_trailing_metadata(self, md):
            self.trailers = md

    ctx = Ctx()
    abort_context(ctx, FailedPrecondition("closed", reason="SESSION_NOT_ACTIVE"))
    assert ctx.code_ == grpc.StatusCode.FAILED_PRECONDITION and ctx.details_ == "closed"
    err = error_from_rpc_error(_FakeRpcError(ctx.code_, ctx.details_, ctx.trailers))
    assert isinstance(err, FailedPrecondition) and err.reason == "SESSION_NOT_ACTIVE"


def test_streaming_method_on_a_ray_context_reraises_after_setting_the_status() -> None:
    class Handler:
        @grpc_method()
        def StreamSession(self, request, context):
            raise NotFound("no such session", reason="SESSION_NOT_FOUND")
            yield  # pragma: no cover  # noqa: V201 - the yield makes it a generator

    class Ctx:
        def code(self):
            return getattr(self, "code_", None)

        def set_code(self, code):
            self.code_ = code

        def set_details(self, details):
            self.details_ = details

        def set_trailing_metadata(self, md):
            self.trailers = md

    ctx = Ctx()
    with pytest.raises(NotFound):
        list(Handler().StreamSession(None, ctx))
    assert ctx.code_ == grpc.StatusCode.NOT_FOUND  # Ray keeps code + details of a raised error


def test_long_messages_are_truncated() -> None:
    _, details, _ = to_status(InvalidArgument("x" * 5000))
    assert len(details) <= 1024


# ---- tensors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int64, torch.int32, torch.bool]
)
def test_tensor_round_trip(dtype: torch.dtype) -> None:
    t = (torch.randn(2, 3, 5) * 50).to(dtype)
    msg = tensor_to_proto(t)
    assert msg.dtype == str(dtype).removeprefix("torch.") and list(msg.shape) == [2, 3, 5]
    assert len(msg.data) == t.numel() * t.element_size()
    back = tensor_from_proto(msg)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(
        back.view(torch.uint8) if dtype != torch.bool else back, t.view(torch.uint8) if dtype != torch.bool else t
    )
    back.add_(1) if dtype != torch.bool else back.logical_not_()  # owned and writable


def test_tensor_wire_layout_is_little_endian_and_bf16_is_bit_exact() -> None:
    assert tensor_to_proto(torch.tensor([1.0])).data == struct.pack("<f", 1.0)
    assert tensor_to_proto(torch.tensor([1.0], dtype=torch.bfloat16)).data == b"\x80\x3f"
    assert tensor_to_proto(torch.tensor([258], dtype=torch.int64)).data == struct.pack("<q", 258)
    special = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40, 3.0e38], dtype=torch.bfloat16)
    back = tensor_from_proto(tensor_to_proto(special))
    assert torch.equal(back.view(torch.int16), special.view(torch.int16))


def test_tensor_non_contiguous_scalar_and_empty() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # non-contiguous [4, 3]
    assert torch.equal(tensor_from_proto(tensor_to_proto(t)), t)
    scalar = tensor_from_proto(tensor_to_proto(torch.tensor(7, dtype=torch.int64)))
    assert scalar.shape == () and scalar.item() == 7
    empty = tensor_from_proto(tensor_to_proto(torch.zeros(1, 0, 4096, dtype=torch.bfloat16)))
    assert empty.shape == (1, 0, 4096) and empty.dtype == torch.bfloat16
    with pytest.raises(TypeError):
        tensor_to_proto(torch.zeros(2, dtype=torch.complex64))


def _tensor(dtype="float32", shape=(2, 2), data=b"\x00" * 16) -> common_pb2.Tensor:
    return common_pb2.Tensor(dtype=dtype, shape=list(shape), data=data)


@pytest.mark.parametrize(
    "msg,kwargs,needle",
    [
        (_tensor(dtype="float64"), {}, "unsupported dtype"),
        (_tensor(dtype="torch.float32"), {}, "unsupported dtype"),
        (_tensor(shape=(1,) * 7, data=b"\x00" * 4), {}, "rank 7"),
        (_tensor(shape=(-1, 4)), {}, "negative dimension"),
        (_tensor(data=b"\x00" * 15), {}, "data is 15 bytes, expected 16"),
        (_tensor(data=b"\x00" * 17), {}, "data is 17 bytes, expected 16"),
        (_tensor(shape=(2**31, 2**31), data=b""), {}, "over the limit"),  # checked before allocating
        (_tensor(), {"max_bytes": 8}, "over the limit of 8"),
        (_tensor(), {"expected_shape": (1, None, 2)}, "expected [1, *, 2]"),
        (_tensor(), {"expected_shape": (2, 3)}, "shape is [2, 2]"),
        (_tensor(), {"dtypes": ("bfloat16",)}, "expected bfloat16"),
        (_tensor(dtype="bool", shape=(2,), data=b"\x01\x02"), {}, "bool data"),
    ],
)
def test_bad_tensors_are_invalid_argument(msg, kwargs, needle) -> None:
    with pytest.raises(InvalidArgument) as info:
        tensor_from_proto(msg, field="latents", **kwargs)
    err = info.value
    assert err.reason == "TENSOR_INVALID" and err.metadata["field"] == "latents"
    assert err.message.startswith("latents: ") and needle in err.message


def test_expected_shape_with_free_dimensions_passes() -> None:
    t = tensor_from_proto(tensor_to_proto(torch.zeros(1, 7, 16)), expected_shape=(1, None, 16), dtypes=("float32",))
    assert t.shape == (1, 7, 16)


def test_text_embedding_trim_and_pad_are_exact_inverses() -> None:
    emb = torch.zeros(1, 32, 16, dtype=torch.bfloat16)  # [1, L, D]
    emb[0, :5] = torch.randn(5, 16, dtype=torch.bfloat16)
    emb[0, 2] = 0  # a zero row before the last real token is kept
    trimmed, n = trim_text_embedding(emb)
    assert n == 5 and trimmed.shape == (1, 5, 16)
    wire = tensor_from_proto(tensor_to_proto(trimmed), expected_shape=(1, None, 16))
    padded = pad_text_embedding(wire, 32)
    assert padded.dtype == torch.bfloat16 and torch.equal(padded, emb)
    assert pad_text_embedding(emb, 32) is emb  # already full length

    zeros, n0 = trim_text_embedding(torch.zeros(1, 8, 4))
    assert n0 == 0 and zeros.shape == (1, 0, 4) and torch.equal(pad_text_embedding(zeros, 8), torch.zeros(1, 8, 4))
    full, nf = trim_text_embedding(torch.ones(1, 8, 4))
    assert nf == 8 and full.shape == (1, 8, 4)


def test_text_embedding_bad_shapes() -> None:
    with pytest.raises(ValueError):
        trim_text_embedding(torch.zeros(8, 4))
    with pytest.raises(InvalidArgument, match="more than the maximum of 4"):
        pad_text_embedding(torch.ones(1, 5, 2), 4)
    with pytest.raises(InvalidArgument, match="expected a text embedding"):
        pad_text_embedding(torch.ones(2, 5, 2), 8)


# ---- auth ----------------------------------------------------------------------------------

KEY_A = "fc_live_alpha_0123456789"
KEY_B = "fc_live_bravo_9876543210"


@pytest.fixture
def auth() -> ApiKeyAuth:
    return ApiKeyAuth({KEY_A: "acme", KEY_B: "globex.eu"})


@pytest.mark.parametrize(
    "metadata",
    [
        [("x-api-key", KEY_A)],
        [("X-Api-Key", KEY_A)],
        [("authorization", f"Bearer {KEY_A}")],
        [("Authorization", f"bearer  {KEY_A} ")],
        [("user-agent", "grpc-python"), ("x-api-key", KEY_A), ("authorization", f"Bearer {KEY_A}")],
    ],
)
def test_known_key_resolves_to_its_tenant(auth: ApiKeyAuth, metadata) -> None:
    assert auth.tenant_from_metadata(metadata) == "acme"


def test_each_key_has_its_own_tenant(auth: ApiKeyAuth) -> None:
    assert auth.tenant_from_metadata([("x-api-key", KEY_B)]) == "globex.eu"


@pytest.mark.parametrize(
    "metadata,needle",
    [
        ([], "missing"),
        (None, "missing"),
        ([("x-api-key", "")], "missing"),
        ([("user-agent", "x")], "x-api-key"),
        ([("x-api-key", "fc_live_wrong")], "unknown API key"),
        ([("x-api-key", KEY_A + "x")], "unknown API key"),
        ([("authorization", f"Basic {KEY_A}")], "Bearer"),
        ([("authorization", "Bearer ")], "Bearer"),
        ([("x-api-key", KEY_A), ("authorization", f"Bearer {KEY_B}")], "conflicting"),
        ([("x-api-key-bin", b"\x00")], "missing"),
    ],
)
def test_bad_credentials_are_unauthenticated_and_never_echoed(auth: ApiKeyAuth, metadata, needle) -> None:
    with pytest.raises(Unauthenticated) as info:
        auth.tenant_from_metadata(metadata)
    err = info.value
    assert err.code == grpc.StatusCode.UNAUTHENTICATED and needle in err.message
    for key in (KEY_A, KEY_B, "fc_live_wrong"):
        assert key not in err.message and key not in repr(err)


def test_only_digests_are_kept(auth: ApiKeyAuth) -> None:
    state = repr(vars(auth)) + repr(auth)
    assert KEY_A not in state and KEY_B not in state
    assert len(auth) == 2


def test_from_digests(auth: ApiKeyAuth) -> None:
    by_digest = ApiKeyAuth.from_digests({key_digest(KEY_A).hex(): "acme"})
    assert by_digest.tenant_from_metadata([("x-api-key", KEY_A)]) == "acme"
    with pytest.raises(ValueError):
        ApiKeyAuth.from_digests({"not-hex": "acme"})


@pytest.mark.parametrize("tenant", ["", "Acme", "-acme", "a" * 65, "ac me", "acme/x"])
def test_bad_tenant_names_are_rejected(tenant: str) -> None:
    with pytest.raises(ValueError, match="tenant"):
        ApiKeyAuth({KEY_A: tenant})


def test_bad_configured_key_is_rejected_without_echo() -> None:
    with pytest.raises(ValueError) as info:
        ApiKeyAuth({"secret with space": "acme"})
    assert "secret" not in str(info.value)
    with pytest.raises(ValueError):
        ApiKeyAuth({"": "acme"})


# ---- validation ----------------------------------------------------------------------------

LIMITS = Limits()
TENANT = "acme"
SESSION_ID = "ses_" + "a" * 26


def _png(width: int = 32, height: int = 24, color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(width: int = 32, height: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (1, 2, 3)).save(buf, format="JPEG")
    return buf.getvalue()


def _png_bomb(side: int) -> bytes:
    """A valid 1-bit grayscale PNG of side x side pixels, all black: tiny on disk, huge decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _create(**fields) -> studio_pb2.CreateSessionRequest:
    req = studio_pb2.CreateSessionRequest(
        reference=common_pb2.ImageInput(data=_png()),
        garment=common_pb2.ImageInput(catalog_id="sku-123"),
        prompt="  a person walks towards the camera  ",
    )
    for name, value in fields.items():
        if value is None:
            req.ClearField(name)
        elif isinstance(value, str):
            setattr(req, name, value)
        else:
            getattr(req, name).CopyFrom(value)
    return req


def _invalid(call, *args, **kwargs) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        call(*args, **kwargs)
    return info.value


def test_valid_create_session() -> None:
    spec = parse_create_session(_create(), LIMITS, tenant=TENANT)
    ref = spec.reference
    assert ref.source == "data" and ref.content_type == "image/png" and (ref.width, ref.height) == (32, 24)
    assert ref.image is not None and ref.image.mode == "RGB"
    assert ref.garment_id == f"upload:{ref.sha256}" and len(ref.sha256) == 64
    assert spec.garment == ImageRef(catalog_id="sku-123") and spec.garment.garment_id == "sku-123"
    assert spec.prompt == "a person walks towards the camera"
    assert spec.seed is None and spec.request_id is None
    opts = spec.options
    assert opts.max_chunks == LIMITS.max_chunks_per_session
    assert (opts.width, opts.height, opts.preset, opts.max_duration_seconds, opts.idle_timeout_seconds) == (None,) * 5
    assert opts.switch == SwitchOptionsSpec() and opts.switch.explicit() == {}  # unset: the server's defaults


def test_create_session_options_are_read_exactly() -> None:
    options = common_pb2.SessionOptions(
        seed=0,
        max_chunks=40,
        max_duration_seconds=12.5,
        width=832,
        height=480,
        preset="wan2.2-ti2v-5b",
        idle_timeout_seconds=1e9,
        switch_options=common_pb2.SwitchOptions(withdraw_history_kv=False),
    )
    req = _create(options=options, request_id="req-0f3c:7", garment=common_pb2.ImageInput(data=_jpeg()))
    spec = parse_create_session(req, LIMITS, tenant=TENANT)
    assert spec.seed == 0  # an explicit zero seed is a seed
    o = spec.options
    assert (o.max_chunks, o.max_duration_seconds, o.width, o.height, o.preset) == (40, 12.5, 832, 480, "wan2.2-ti2v-5b")
    assert o.idle_timeout_seconds == LIMITS.max_idle_timeout_seconds  # clamped
    assert o.switch == SwitchOptionsSpec(withdraw=False)
    assert spec.request_id == "req-0f3c:7"
    assert spec.garment.content_type == "image/jpeg"


@pytest.mark.parametrize(
    "image,needle",
    [
        (b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, "garment.data"),
        (_png()[:60], "garment.data"),  # truncated
        (b"GIF89a" + b"\x00" * 40, "not a JPEG, PNG or WebP"),
        (b"%PDF-1.4 hello", "not a JPEG, PNG or WebP"),
        (b"", "garment.data"),
        (_png(8, 8), "smaller than 16"),
    ],
)
def test_bad_image_bytes_are_image_invalid(image: bytes, needle: str) -> None:
    err = _invalid(parse_create_session, _create(garment=common_pb2.ImageInput(data=image)), LIMITS, tenant=TENANT)
    assert isinstance(err, InvalidArgument) and err.reason == "IMAGE_INVALID"
    assert err.metadata["field"] == "garment.data" and needle in err.message


def test_oversized_image_bytes_are_image_too_large() -> None:
    limits = Limits(max_image_bytes=1000)
    err = _invalid(
        parse_create_session,
        _create(reference=common_pb2.ImageInput(data=_png(400, 400, (1, 2, 3)) + b"\x00" * 1000)),
        limits,
    )
    assert isinstance(err, InvalidArgument) and err.reason == "IMAGE_TOO_LARGE"
    assert err.metadata == {"field": "reference.data", "limit": "1000"}


@pytest.mark.parametrize("side", [20000, 7000])  # 400 M pixels (PIL's bomb limit) and 49 M (ours, 40 M)
def test_decompression_bomb_is_refused_before_decoding(side: int) -> None:
    bomb = _png_bomb(side)
    assert len(bomb) < LIMITS.max_image_bytes
    err = _invalid(parse_create_session, _create(reference=common_pb2.ImageInput(data=bomb)), LIMITS)
    assert isinstance(err, InvalidArgument) and err.reason == "IMAGE_INVALID"
    assert err.metadata["field"] == "reference.data"
    # the message quotes the configured limit and the image's size, never PIL's own bomb limit
    assert f"over the limit of {LIMITS.max_image_pixels}" in err.message, err.message
    assert f"{side * side} pixels" in err.message and "DOS" not in err.message


@pytest.mark.parametrize(
    "content_type,needle", [("image/gif", "is not one of"), ("image/jpeg", "but the bytes are image/png")]
)
def test_content_type_must_match_the_bytes(content_type: str, needle: str) -> None:
    req = _create(reference=common_pb2.ImageInput(data=_png(), content_type=content_type))
    err = _invalid(parse_create_session, req, LIMITS)
    assert err.reason == "IMAGE_INVALID" and needle in err.message
    ok = _create(reference=common_pb2.ImageInput(data=_png(), content_type="image/PNG"))
    assert parse_create_session(ok, LIMITS).reference.content_type == "image/png"


@pytest.mark.parametrize(
    "prompt,needle", [("", "empty"), ("  \n\t ", "empty"), ("x" * 2001, "limit is 2000"), ("a\x07b", "control")]
)
def test_bad_prompts_are_prompt_invalid(prompt: str, needle: str) -> None:
    err = _invalid(parse_create_session, _create(prompt=prompt), LIMITS)
    assert isinstance(err, InvalidArgument) and err.reason == "PROMPT_INVALID"
    assert err.metadata == {"field": "prompt", "limit": "2000"} and needle in err.message
    update = studio_pb2.UpdatePromptRequest(session_id=SESSION_ID, prompt=prompt)
    assert _invalid(parse_update_prompt, update, LIMITS).reason == "PROMPT_INVALID"


def test_prompt_at_the_limit_is_accepted() -> None:
    assert len(parse_create_session(_create(prompt="y" * 2000), LIMITS).prompt) == 2000


@pytest.mark.parametrize(
    "field_name,image,msg_field",
    [
        ("garment", None, "garment"),
        ("reference", None, "reference"),
        ("garment", common_pb2.ImageInput(content_type="image/png"), "garment"),  # no source set
    ],
)
def test_missing_images(field_name: str, image, msg_field: str) -> None:
    req = _create(**{field_name: image})
    err = _invalid(parse_create_session, req, LIMITS)
    assert isinstance(err, InvalidArgument) and err.metadata["field"] == msg_field
    assert err.message.startswith(f"{msg_field}: ")


@pytest.mark.parametrize("catalog_id", ["SKU-123", "../etc", "sku 1", "-sku", "a" * 65, "sku/1"])
def test_bad_catalog_ids(catalog_id: str) -> None:
    err = _invalid(parse_create_session, _create(garment=common_pb2.ImageInput(catalog_id=catalog_id)), LIMITS)
    assert isinstance(err, InvalidArgument) and err.metadata["field"] == "garment.catalog_id"
    assert catalog_id not in err.message


def test_object_keys_are_scoped_to_the_tenant() -> None:
    own = f"uploads/{TENANT}/" + "ab" * 32
    spec = parse_create_session(_create(garment=common_pb2.ImageInput(object_key=own)), LIMITS, tenant=TENANT)
    assert spec.garment == ImageRef(object_key=own) and spec.garment.garment_id is None
    for other in ("uploads/globex/" + "ab" * 32, "checkpoints/model.safetensors", f"uploads/{TENANT}"):
        err = _invalid(
            parse_create_session, _create(garment=common_pb2.ImageInput(object_key=other)), LIMITS, tenant=TENANT
        )
        assert isinstance(err, NotFound) and err.reason == "OBJECT_NOT_FOUND" and other not in err.message
    for bad in (f"uploads/{TENANT}/../globex/x", "/abs", f"uploads/{TENANT}//x", "a\x00b"):
        err = _invalid(
            parse_create_session, _create(garment=common_pb2.ImageInput(object_key=bad)), LIMITS, tenant=TENANT
        )
        assert isinstance(err, InvalidArgument) and err.metadata["field"] == "garment.object_key"
    # without a tenant the caller scopes keys; only the form is checked
    assert parse_create_session(
        _create(garment=common_pb2.ImageInput(object_key="catalog/x/y")), LIMITS
    ).garment.object_key


@pytest.mark.parametrize(
    "options,field_name,reason",
    [
        (common_pb2.SessionOptions(max_chunks=-1), "options.max_chunks", "FIELD_INVALID"),
        (common_pb2.SessionOptions(max_chunks=100_001), "options.max_chunks", "FIELD_INVALID"),
        (common_pb2.SessionOptions(width=-32), "options.width", "RESOLUTION_UNSUPPORTED"),
        (common_pb2.SessionOptions(height=8192), "options.height", "RESOLUTION_UNSUPPORTED"),
        (common_pb2.SessionOptions(max_duration_seconds=float("nan")), "options.max_duration_seconds", "FIELD_INVALID"),
        (common_pb2.SessionOptions(max_duration_seconds=-1), "options.max_duration_seconds", "FIELD_INVALID"),
        (common_pb2.SessionOptions(idle_timeout_seconds=float("inf")), "options.idle_timeout_seconds", "FIELD_INVALID"),
        (common_pb2.SessionOptions(preset="Wan 2.2"), "options.preset", "FIELD_INVALID"),
    ],
)
def test_bad_session_options(options, field_name: str, reason: str) -> None:
    err = _invalid(parse_create_session, _create(options=options), LIMITS)
    assert isinstance(err, InvalidArgument) and err.reason == reason and err.metadata["field"] == field_name


@pytest.mark.parametrize("request_id", ["x" * 129, "has space", "brace{}"])
def test_bad_request_ids(request_id: str) -> None:
    err = _invalid(parse_create_session, _create(request_id=request_id), LIMITS)
    assert isinstance(err, InvalidArgument) and err.metadata["field"] == "request_id"
    assert parse_request_id("", LIMITS) is None


def test_switch_garment_and_unset_options_mean_on() -> None:
    req = studio_pb2.SwitchGarmentRequest(session_id=SESSION_ID, garment=common_pb2.ImageInput(catalog_id="sku-9"))
    spec = parse_switch_garment(req, LIMITS, tenant=TENANT)
    assert spec.session_id == SESSION_ID and spec.garment.catalog_id == "sku-9"
    assert spec.options == SwitchOptionsSpec() and spec.options.explicit() == {}
    # only the fields that were set travel on (an explicit False is kept, unset ones are not)
    req.options.CopyFrom(common_pb2.SwitchOptions(refresh_garment_kv=True, disentangle_reference_kv=False))
    spec = parse_switch_garment(req, LIMITS)
    assert spec.options == SwitchOptionsSpec(refresh=True, disentangle=False)
    assert spec.options.explicit() == {"refresh_garment_kv": True, "disentangle_reference_kv": False}


def test_switch_garment_errors() -> None:
    missing = studio_pb2.SwitchGarmentRequest(session_id=SESSION_ID)
    assert _invalid(parse_switch_garment, missing, LIMITS).metadata["field"] == "garment"
    bad_id = studio_pb2.SwitchGarmentRequest(session_id="nope", garment=common_pb2.ImageInput(catalog_id="sku-9"))
    assert _invalid(parse_switch_garment, bad_id, LIMITS).metadata["field"] == "session_id"
    corrupt = studio_pb2.SwitchGarmentRequest(
        session_id=SESSION_ID, garment=common_pb2.ImageInput(data=b"\xff\xd8\xff\x00")
    )
    assert _invalid(parse_switch_garment, corrupt, LIMITS).reason == "IMAGE_INVALID"


def test_update_prompt() -> None:
    req = studio_pb2.UpdatePromptRequest(session_id=SESSION_ID, prompt=" dance ", request_id="r1")
    session_id, prompt = parse_update_prompt(req, LIMITS)
    assert (session_id, prompt) == (SESSION_ID, "dance")
    req.request_id = "bad id"
    assert _invalid(parse_update_prompt, req, LIMITS).metadata["field"] == "request_id"


def test_stream_session_resume_index() -> None:
    assert parse_stream_session(studio_pb2.StreamSessionRequest(session_id=SESSION_ID)) == (SESSION_ID, 0)
    assert parse_stream_session(studio_pb2.StreamSessionRequest(session_id=SESSION_ID, resume_from_index=41)) == (
        SESSION_ID,
        41,
    )
    err = _invalid(parse_stream_session, studio_pb2.StreamSessionRequest(session_id=SESSION_ID, resume_from_index=-1))
    assert isinstance(err, InvalidArgument) and err.metadata["field"] == "resume_from_index"


@pytest.mark.parametrize(
    "session_id",
    [
        "",
        "ses_",
        "ses_" + "a" * 25,
        "ses_" + "a" * 27,
        "SES_" + "a" * 26,
        "ses_" + "A" * 26,
        "ses_" + "1" * 26,
        "x" * 200,
    ],
)
def test_bad_session_ids(session_id: str) -> None:
    err = _invalid(validate_session_id, session_id)
    assert isinstance(err, InvalidArgument) and err.metadata["field"] == "session_id"
    if len(session_id) > len("ses_"):
        assert session_id not in err.message  # not echoed
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT


def test_new_session_ids_are_valid_and_unique() -> None:
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000
    for sid in list(ids)[:50]:
        assert validate_session_id(sid) == sid and len(sid) == 30


def test_limits_config() -> None:
    assert LIMITS.max_image_bytes == 20 * 2**20 and LIMITS.request_bytes_limit == 41 * 2**20
    assert Limits(max_request_bytes=5 * 2**20).request_bytes_limit == 5 * 2**20
    with pytest.raises(ValidationError):
        Limits(max_image_bytes=0)
    with pytest.raises(ValidationError):
        Limits(unknown_field=1)
    with pytest.raises(ValidationError):
        Limits(min_image_side=10_000)
