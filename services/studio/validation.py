"""Studio request validation: public protos -> frozen internal specs, or an API error.

Every function here takes an untrusted request, checks it against `Limits` and returns plain
frozen dataclasses the orchestration code can trust. Failures raise `InvalidArgument` (or
`NotFound` for an object key outside the caller's tenant prefixes, when a tenant is given)
with the field path in the message and in ErrorInfo metadata "field", e.g. "garment.data",
"options.max_chunks". Untrusted ids and keys are never echoed in messages. The pieces the
batch job RPCs share (`Limits`, images, prompts) are in services/common/validation.py.

Semantics follow studio.proto / common.proto: zero / unset option fields mean "server
default" (None in the specs, or resolved here when the default is a limit); a SwitchOptions
flag that is unset means ON, resolved per switch, then per session, then true.
"""

from __future__ import annotations

import base64
import math
import re
import secrets
from dataclasses import dataclass
from typing import NamedTuple

from fashionchameleon.v1 import common_pb2, studio_pb2
from services.common.errors import InvalidArgument
from services.common.validation import ImageRef, Limits, invalid, parse_image, parse_prompt, parse_slug

_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:@/+=\-]+$")
_SESSION_ID = re.compile(r"^ses_[a-z2-7]{26}$")
SESSION_ID_PREFIX = "ses_"


# ---- specs ---------------------------------------------------------------------------------


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


def prompt_options_payload(msg: common_pb2.PromptOptions) -> dict:
    """The PromptOptions fields that were set, as the UPDATE_PROMPT command's "options" payload
    (the generator fills the rest with its defaults, `shared.runtime.session.PromptOptions`)."""
    return {"recache_window": bool(msg.recache_window)} if msg.HasField("recache_window") else {}


def parse_stream_session(req: studio_pb2.StreamSessionRequest) -> tuple[str, int]:
    """(session_id, resume_from_index >= 0). Whether the index is still retained is the
    session layer's call (OUT_OF_RANGE / CHUNK_NOT_RETAINED)."""
    session_id = validate_session_id(req.session_id)
    if req.resume_from_index < 0:
        invalid("resume_from_index", f"must be >= 0, got {req.resume_from_index}")
    return session_id, req.resume_from_index


def new_session_id() -> str:
    """A fresh session id: "ses_" + 26 lowercase base32 characters (128 random bits)."""
    return SESSION_ID_PREFIX + base64.b32encode(secrets.token_bytes(16)).decode("ascii").rstrip("=").lower()


def validate_session_id(value: str, field_name: str = "session_id") -> str:
    """`value` if it has the form of `new_session_id()`, else InvalidArgument (value not echoed)."""
    if not value:
        invalid(field_name, "required")
    if not _SESSION_ID.match(value):
        invalid(field_name, "not a session id (expected 'ses_' + 26 base32 characters)")
    return value


# ---- pieces --------------------------------------------------------------------------------


def parse_session_options(msg: common_pb2.SessionOptions, limits: Limits) -> SessionOptionsSpec:
    if msg.max_chunks < 0:
        invalid("options.max_chunks", f"must be >= 0, got {msg.max_chunks}")
    if msg.max_chunks > limits.max_chunks_per_session:
        invalid(
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
        preset=parse_slug(msg.preset, "options.preset") if msg.preset else None,
        idle_timeout_seconds=min(idle, limits.max_idle_timeout_seconds) if idle else None,
    )


def parse_request_id(value: str, limits: Limits) -> str | None:
    if not value:
        return None
    if len(value) > limits.max_request_id_chars:
        invalid("request_id", f"{len(value)} characters, over the limit of {limits.max_request_id_chars}")
    if not _REQUEST_ID.match(value):
        invalid("request_id", "may only hold letters, digits and _ . : @ / + = -")
    return value


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
        invalid(field_name, f"must be a finite number of seconds >= 0, got {value}")
    return value
