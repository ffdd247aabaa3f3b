"""Studio request validation: public protos -> frozen internal specs, or an API error.

Every function here takes an untrusted request, checks it against `Limits` and returns plain
frozen dataclasses the orchestration code can trust. Failures raise `InvalidArgument` (or
`NotFound` for an object key outside the caller's tenant prefixes, when a tenant is given)
with the field path in the message and in ErrorInfo metadata "field", e.g. "garment.data",
"options.max_chunks". Untrusted ids and keys are never echoed in messages.

Semantics follow studio.proto / common.proto: zero / unset option fields mean "server
default" (None in the specs, or resolved here when the default is a limit); a SwitchOptions
flag that is unset means ON, resolved per switch, then per session, then true.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fashionchameleon.v1 import common_pb2, studio_pb2
from services.common.errors import InvalidArgument, NotFound
from shared.media.images import ImageError, load_image
from shared.models.text_encoder import validate_prompt
from shared.storage.base import validate_key
from shared.storage.catalog import sniff_image_type, validate_slug

CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:@/+=\-]+$")
_SESSION_ID = re.compile(r"^ses_[a-z2-7]{26}$")
SESSION_ID_PREFIX = "ses_"


class Limits(BaseModel):
    """Bounds on what a Studio client may send. Sizes in bytes, pixels, characters, chunks, seconds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_image_bytes: int = Field(default=20 * 2**20, gt=0)  # encoded size of one ImageInput.data
    max_image_pixels: int = Field(default=40_000_000, gt=0)  # width x height, checked before decoding
    min_image_side: int = Field(default=16, ge=1)  # pixels, both sides
    max_prompt_chars: int = Field(default=2000, gt=0)  # Unicode code points after stripping
    max_chunks_per_session: int = Field(default=100_000, gt=0)  # SessionOptions.max_chunks = 0 resolves to this
    max_idle_timeout_seconds: float = Field(default=3600.0, gt=0)  # idle_timeout_seconds is clamped to this
    max_video_side: int = Field(default=4096, gt=0)  # pixels; the preset checks its own multiples
    max_request_id_chars: int = Field(default=128, gt=0)
    # The public server's grpc.max_receive_message_length (None: two images plus 1 MiB, see
    # `request_bytes_limit`); larger messages are refused by gRPC with RESOURCE_EXHAUSTED.
    max_request_bytes: int | None = Field(default=None, gt=0)
    # Object keys a tenant may reference ("{tenant}" is substituted); anything else is NOT_FOUND.
    object_key_prefixes: tuple[str, ...] = ("uploads/{tenant}/",)

    @property
    def request_bytes_limit(self) -> int:
        """Bytes one request message may have: `max_request_bytes` or two images plus 1 MiB."""
        return self.max_request_bytes or 2 * self.max_image_bytes + 2**20

    @model_validator(mode="after")
    def _check(self) -> Limits:
        if self.min_image_side**2 > self.max_image_pixels:
            raise ValueError("min_image_side^2 exceeds max_image_pixels")
        return self


# ---- specs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """An ImageInput after validation: exactly one of `data`, `catalog_id`, `object_key` is set.

    For `data` the bytes were sniffed (JPEG / PNG / WebP) and fully decoded by `load_image`
    within the limits; `image` is the decoded 8-bit RGB image, `width` / `height` its size in
    pixels after EXIF orientation. Catalog ids and object keys are only checked for form here;
    whether they exist is known when they are fetched.
    """

    data: bytes | None = field(default=None, repr=False)
    catalog_id: str | None = None
    object_key: str | None = None
    sha256: str | None = None  # lowercase hex of `data`
    content_type: str | None = None  # sniffed from `data`, one of CONTENT_TYPES
    width: int | None = None
    height: int | None = None
    image: Image.Image | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.data, self.catalog_id, self.object_key)) != 1:
            raise ValueError("exactly one of data, catalog_id and object_key must be set")

    @property
    def source(self) -> str:
        """The ImageInput oneof field that was set: "data", "catalog_id" or "object_key"."""
        return "data" if self.data is not None else "catalog_id" if self.catalog_id is not None else "object_key"

    @property
    def garment_id(self) -> str | None:
        """Session.garment_id for this image: the catalog id, or "upload:<sha256>" for bytes
        (None for an object key: its content hash is known once fetched)."""
        if self.catalog_id is not None:
            return self.catalog_id
        return f"upload:{self.sha256}" if self.sha256 is not None else None


@dataclass(frozen=True)
class SwitchSteps:
    """The three steps of one garment switch, resolved (paper 4.3)."""

    refresh_garment_kv: bool
    withdraw_history_kv: bool
    disentangle_reference_kv: bool


@dataclass(frozen=True)
class SwitchOptionsSpec:
    """SwitchOptions as sent: None = unset (falls back to the session default, then ON)."""

    refresh: bool | None = None
    withdraw: bool | None = None
    disentangle: bool | None = None

    @classmethod
    def from_proto(cls, msg: common_pb2.SwitchOptions) -> SwitchOptionsSpec:
        def get(name: str) -> bool | None:
            return getattr(msg, name) if msg.HasField(name) else None

        return cls(get("refresh_garment_kv"), get("withdraw_history_kv"), get("disentangle_reference_kv"))

    def explicit(self) -> dict[str, bool]:
        """The fields that were set, by their SwitchOptions proto names."""
        values = {
            "refresh_garment_kv": self.refresh,
            "withdraw_history_kv": self.withdraw,
            "disentangle_reference_kv": self.disentangle,
        }
        return {name: value for name, value in values.items() if value is not None}

    def over(self, defaults: SwitchOptionsSpec) -> SwitchOptionsSpec:
        """Per-field: this value if set, else the one in `defaults`."""
        return SwitchOptionsSpec(
            self.refresh if self.refresh is not None else defaults.refresh,
            self.withdraw if self.withdraw is not None else defaults.withdraw,
            self.disentangle if self.disentangle is not None else defaults.disentangle,
        )

    def resolve(self, session_defaults: SwitchOptionsSpec | None = None) -> SwitchSteps:
        """Per-switch value if set, else the session's if set, else True."""
        merged = self.over(session_defaults or SwitchOptionsSpec())
        return SwitchSteps(
            refresh_garment_kv=merged.refresh is not False,
            withdraw_history_kv=merged.withdraw is not False,
            disentangle_reference_kv=merged.disentangle is not False,
        )


@dataclass(frozen=True)
class SessionOptionsSpec:
    """SessionOptions minus the seed. None = server default (chosen by preset / session config)."""

    max_chunks: int  # resolved: 0 on the wire means Limits.max_chunks_per_session
    max_duration_seconds: float | None = None  # video seconds; None = no duration limit
    width: int | None = None  # pixels; None = preset default
    height: int | None = None
    switch: SwitchOptionsSpec = SwitchOptionsSpec()
    preset: str | None = None
    idle_timeout_seconds: float | None = None  # clamped to Limits.max_idle_timeout_seconds


@dataclass(frozen=True)
class CreateSessionSpec:
    reference: ImageRef
    garment: ImageRef
    prompt: str  # stripped
    seed: int | None  # None: the server draws one
    options: SessionOptionsSpec
    request_id: str | None = None


@dataclass(frozen=True)
class SwitchSpec:
    session_id: str
    garment: ImageRef
    options: SwitchOptionsSpec  # per-switch overrides; resolve against the session's defaults
    request_id: str | None = None


class PromptUpdate(NamedTuple):
    """UpdatePromptRequest after validation (its request_id: `parse_request_id`)."""

    session_id: str
    prompt: str  # stripped


# ---- parsers -------------------------------------------------------------------------------


def parse_create_session(
    req: studio_pb2.CreateSessionRequest, limits: Limits, *, tenant: str | None = None
) -> CreateSessionSpec:
    """Validate a CreateSessionRequest. With `tenant`, object keys outside
    `Limits.object_key_prefixes` of that tenant are NOT_FOUND; without it the caller must scope
    object keys itself (they are only checked for form)."""
    options = req.options
    return CreateSessionSpec(
        reference=parse_image(req, "reference", limits, tenant=tenant),
        garment=parse_image(req, "garment", limits, tenant=tenant),
        prompt=parse_prompt(req.prompt, limits, "prompt"),
        seed=options.seed if options.HasField("seed") else None,
        options=parse_session_options(options, limits),
        request_id=parse_request_id(req.request_id, limits),
    )


def parse_switch_garment(
    req: studio_pb2.SwitchGarmentRequest, limits: Limits, *, tenant: str | None = None
) -> SwitchSpec:
    """Validate a SwitchGarmentRequest (`tenant` as in `parse_create_session`)."""
    return SwitchSpec(
        session_id=validate_session_id(req.session_id),
        garment=parse_image(req, "garment", limits, tenant=tenant),
        options=SwitchOptionsSpec.from_proto(req.options),
        request_id=parse_request_id(req.request_id, limits),
    )


def parse_update_prompt(req: studio_pb2.UpdatePromptRequest, limits: Limits) -> PromptUpdate:
    """(session_id, prompt); request_id is checked too (read it with `parse_request_id`)."""
    session_id = validate_session_id(req.session_id)
    prompt = parse_prompt(req.prompt, limits, "prompt")
    parse_request_id(req.request_id, limits)
    return PromptUpdate(session_id, prompt)


def parse_stream_session(req: studio_pb2.StreamSessionRequest) -> tuple[str, int]:
    """(session_id, resume_from_index >= 0). Whether the index is still retained is the
    session layer's call (OUT_OF_RANGE / CHUNK_NOT_RETAINED)."""
    session_id = validate_session_id(req.session_id)
    if req.resume_from_index < 0:
        _invalid("resume_from_index", f"must be >= 0, got {req.resume_from_index}")
    return session_id, req.resume_from_index


def parse_session_request(req: studio_pb2.CloseSessionRequest | studio_pb2.GetSessionRequest) -> str:
    """The session id of a CloseSessionRequest / GetSessionRequest."""
    return validate_session_id(req.session_id)


def new_session_id() -> str:
    """A fresh session id: "ses_" + 26 lowercase base32 characters (128 random bits)."""
    return SESSION_ID_PREFIX + base64.b32encode(secrets.token_bytes(16)).decode("ascii").rstrip("=").lower()


def validate_session_id(value: str, field_name: str = "session_id") -> str:
    """`value` if it has the form of `new_session_id()`, else InvalidArgument (value not echoed)."""
    if not value:
        _invalid(field_name, "required")
    if not _SESSION_ID.match(value):
        _invalid(field_name, "not a session id (expected 'ses_' + 26 base32 characters)")
    return value


# ---- pieces --------------------------------------------------------------------------------


def parse_image(req: Any, name: str, limits: Limits, *, tenant: str | None = None) -> ImageRef:
    """The ImageInput field `name` of `req`: exactly one of data / catalog_id / object_key."""
    if not req.HasField(name):
        _invalid(name, "required (one of data, catalog_id or object_key)")
    msg: common_pb2.ImageInput = getattr(req, name)
    source = msg.WhichOneof("source")
    if source == "data":
        return _parse_image_bytes(msg.data, msg.content_type, f"{name}.data", limits)
    if source == "catalog_id":
        return ImageRef(catalog_id=_slug(msg.catalog_id, f"{name}.catalog_id"))
    if source == "object_key":
        return ImageRef(object_key=_object_key(msg.object_key, f"{name}.object_key", limits, tenant))
    _invalid(name, "needs one of data, catalog_id or object_key")


def parse_prompt(prompt: str, limits: Limits, field_name: str) -> str:
    try:
        return validate_prompt(prompt, limits.max_prompt_chars)
    except ValueError as e:
        raise InvalidArgument(
            f"{field_name}: {e}",
            reason="PROMPT_INVALID",
            metadata={"field": field_name, "limit": limits.max_prompt_chars},
        ) from None


def parse_session_options(msg: common_pb2.SessionOptions, limits: Limits) -> SessionOptionsSpec:
    if msg.max_chunks < 0:
        _invalid("options.max_chunks", f"must be >= 0, got {msg.max_chunks}")
    if msg.max_chunks > limits.max_chunks_per_session:
        _invalid(
            "options.max_chunks",
            f"{msg.max_chunks} is over the limit of {limits.max_chunks_per_session}",
            limit=limits.max_chunks_per_session,
        )
    duration = _non_negative_seconds(msg.max_duration_seconds, "options.max_duration_seconds")
    idle = _non_negative_seconds(msg.idle_timeout_seconds, "options.idle_timeout_seconds")
    return SessionOptionsSpec(
        max_chunks=msg.max_chunks or limits.max_chunks_per_session,
        max_duration_seconds=duration or None,
        width=_video_side(msg.width, "options.width", limits),
        height=_video_side(msg.height, "options.height", limits),
        switch=SwitchOptionsSpec.from_proto(msg.switch_options),
        preset=_slug(msg.preset, "options.preset") if msg.preset else None,
        idle_timeout_seconds=min(idle, limits.max_idle_timeout_seconds) if idle else None,
    )


def parse_request_id(value: str, limits: Limits) -> str | None:
    if not value:
        return None
    if len(value) > limits.max_request_id_chars:
        _invalid("request_id", f"{len(value)} characters, over the limit of {limits.max_request_id_chars}")
    if not _REQUEST_ID.match(value):
        _invalid("request_id", "may only hold letters, digits and _ . : @ / + = -")
    return value


def check_resolution(height: int, width: int, *, multiple_of: int, max_pixels: int | None = None) -> None:
    """InvalidArgument RESOLUTION_UNSUPPORTED unless both sides are positive multiples of
    `multiple_of` (the preset's spatial stride) and height x width <= `max_pixels`."""
    metadata: dict[str, object] = {"multiple_of": multiple_of}
    if max_pixels is not None:
        metadata["max_pixels"] = max_pixels
    if height <= 0 or width <= 0 or height % multiple_of or width % multiple_of:
        raise InvalidArgument(
            f"resolution {width}x{height} must be positive multiples of {multiple_of}",
            reason="RESOLUTION_UNSUPPORTED",
            metadata=metadata,
        )
    if max_pixels is not None and height * width > max_pixels:
        raise InvalidArgument(
            f"resolution {width}x{height} is over the limit of {max_pixels} pixels",
            reason="RESOLUTION_UNSUPPORTED",
            metadata=metadata,
        )


def _parse_image_bytes(data: bytes, content_type: str, field_name: str, limits: Limits) -> ImageRef:
    if len(data) > limits.max_image_bytes:
        raise InvalidArgument(
            f"{field_name}: image is {len(data)} bytes, over the limit of {limits.max_image_bytes}",
            reason="IMAGE_TOO_LARGE",
            metadata={"field": field_name, "limit": limits.max_image_bytes},
        )
    try:
        sniffed = sniff_image_type(data)
    except ValueError:
        _bad_image(field_name, "not a JPEG, PNG or WebP image")
    if content_type and content_type.lower() not in CONTENT_TYPES:
        _bad_image(field_name, f"content_type {content_type[:64]!r} is not one of {', '.join(CONTENT_TYPES)}")
    if content_type and content_type.lower() != sniffed:
        _bad_image(field_name, f"content_type is {content_type.lower()} but the bytes are {sniffed}")
    try:
        image = load_image(
            data,
            max_bytes=limits.max_image_bytes,
            max_pixels=limits.max_image_pixels,
            min_side=limits.min_image_side,
        )
    except ImageError as e:
        _bad_image(field_name, str(e))
    return ImageRef(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        content_type=sniffed,
        width=image.width,
        height=image.height,
        image=image,
    )


def _object_key(key: str, field_name: str, limits: Limits, tenant: str | None) -> str:
    try:
        validate_key(key)
    except ValueError:
        _invalid(field_name, "not a valid object key")
    if tenant is None:
        return key
    if not any(key.startswith(p.format(tenant=tenant)) for p in limits.object_key_prefixes):
        # Other tenants' objects and internal objects look the same as missing ones.
        raise NotFound(f"{field_name}: no such object", reason="OBJECT_NOT_FOUND", metadata={"field": field_name})
    return key


def _slug(value: str, field_name: str) -> str:
    try:
        return validate_slug(value)
    except ValueError:
        _invalid(field_name, "must match [a-z0-9][a-z0-9._-]{0,63}")  # the value is not echoed


def _video_side(value: int, field_name: str, limits: Limits) -> int | None:
    if value < 0 or value > limits.max_video_side:
        raise InvalidArgument(
            f"{field_name}: {value} pixels is outside 0..{limits.max_video_side} (0 = preset default)",
            reason="RESOLUTION_UNSUPPORTED",
            metadata={"field": field_name, "limit": limits.max_video_side},
        )
    return value or None


def _non_negative_seconds(value: float, field_name: str) -> float:
    if not math.isfinite(value) or value < 0:
        _invalid(field_name, f"must be a finite number of seconds >= 0, got {value}")
    return value


def _bad_image(field_name: str, problem: str) -> NoReturn:
    raise InvalidArgument(f"{field_name}: {problem}", reason="IMAGE_INVALID", metadata={"field": field_name})


def _invalid(field_name: str, problem: str, **metadata: object) -> NoReturn:
    raise InvalidArgument(f"{field_name}: {problem}", reason="FIELD_INVALID", metadata={"field": field_name, **metadata})
