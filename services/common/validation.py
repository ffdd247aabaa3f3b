"""Validation shared by the public RPCs of the gateway: Studio sessions (services/studio) and
batch jobs (services/jobs). Untrusted protos -> frozen values, or an API error.

Failures raise `InvalidArgument` (or `NotFound` for an object key outside the caller's tenant
prefixes, when a tenant is given) with the field path in the message and in ErrorInfo metadata
"field", e.g. "garment.data". Untrusted ids and keys are never echoed in messages.

- `Limits`: bounds on what a client may send.
- `ImageRef` / `parse_image`: an ImageInput (bytes, catalog id or object key), bytes fully decoded.
- `parse_prompt`, `parse_slug`, `invalid`: the prompt check, slugs, the FIELD_INVALID error.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, NoReturn

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fashionchameleon.v1 import common_pb2
from services.common.errors import InvalidArgument, NotFound
from shared.media.images import ImageError, load_image
from shared.models.prompts import validate_prompt
from shared.storage.base import validate_key
from shared.storage.catalog import sniff_image_type, validate_slug

CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp")


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


# ---- parsers -------------------------------------------------------------------------------


def parse_image(req: Any, name: str, limits: Limits, *, tenant: str | None = None) -> ImageRef:
    """The ImageInput field `name` of `req`: exactly one of data / catalog_id / object_key."""
    if not req.HasField(name):
        invalid(name, "required (one of data, catalog_id or object_key)")
    msg: common_pb2.ImageInput = getattr(req, name)
    source = msg.WhichOneof("source")
    if source == "data":
        return _parse_image_bytes(msg.data, msg.content_type, f"{name}.data", limits)
    if source == "catalog_id":
        return ImageRef(catalog_id=parse_slug(msg.catalog_id, f"{name}.catalog_id"))
    if source == "object_key":
        return ImageRef(object_key=_object_key(msg.object_key, f"{name}.object_key", limits, tenant))
    invalid(name, "needs one of data, catalog_id or object_key")


def parse_prompt(prompt: str, limits: Limits, field_name: str) -> str:
    try:
        return validate_prompt(prompt, limits.max_prompt_chars)
    except ValueError as e:
        raise InvalidArgument(
            f"{field_name}: {e}",
            reason="PROMPT_INVALID",
            metadata={"field": field_name, "limit": limits.max_prompt_chars},
        ) from None


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
        invalid(field_name, "not a valid object key")
    if tenant is None:
        return key
    if not any(key.startswith(p.format(tenant=tenant)) for p in limits.object_key_prefixes):
        # Other tenants' objects and internal objects look the same as missing ones.
        raise NotFound(f"{field_name}: no such object", reason="OBJECT_NOT_FOUND", metadata={"field": field_name})
    return key


def parse_slug(value: str, field_name: str) -> str:
    try:
        return validate_slug(value)
    except ValueError:
        invalid(field_name, "must match [a-z0-9][a-z0-9._-]{0,63}")  # the value is not echoed


def _bad_image(field_name: str, problem: str) -> NoReturn:
    raise InvalidArgument(f"{field_name}: {problem}", reason="IMAGE_INVALID", metadata={"field": field_name})


def invalid(field_name: str, problem: str, **metadata: object) -> NoReturn:
    raise InvalidArgument(
        f"{field_name}: {problem}", reason="FIELD_INVALID", metadata={"field": field_name, **metadata}
    )
