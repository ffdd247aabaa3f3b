from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_SESSION_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_SESSION_NOT_ACTIVE: _ClassVar[ErrorReason]
    ERROR_REASON_SESSION_EXPIRED: _ClassVar[ErrorReason]
    ERROR_REASON_CATALOG_ITEM_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_OBJECT_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_IMAGE_INVALID: _ClassVar[ErrorReason]
    ERROR_REASON_IMAGE_TOO_LARGE: _ClassVar[ErrorReason]
    ERROR_REASON_RESOLUTION_UNSUPPORTED: _ClassVar[ErrorReason]
    ERROR_REASON_PROMPT_INVALID: _ClassVar[ErrorReason]
    ERROR_REASON_TENSOR_INVALID: _ClassVar[ErrorReason]
    ERROR_REASON_PRESET_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_CAPACITY_EXHAUSTED: _ClassVar[ErrorReason]
    ERROR_REASON_QUOTA_EXCEEDED: _ClassVar[ErrorReason]
    ERROR_REASON_CHUNK_NOT_RETAINED: _ClassVar[ErrorReason]
    ERROR_REASON_CHUNK_OUT_OF_ORDER: _ClassVar[ErrorReason]
    ERROR_REASON_SESSION_NOT_ON_REPLICA: _ClassVar[ErrorReason]
    ERROR_REASON_SESSION_LIMIT_REACHED: _ClassVar[ErrorReason]
    ERROR_REASON_IDEMPOTENCY_KEY_REUSED: _ClassVar[ErrorReason]
    ERROR_REASON_API_KEY_INVALID: _ClassVar[ErrorReason]
    ERROR_REASON_FIELD_INVALID: _ClassVar[ErrorReason]
    ERROR_REASON_REQUEST_MALFORMED: _ClassVar[ErrorReason]
    ERROR_REASON_RESUME_PAST_END: _ClassVar[ErrorReason]
    ERROR_REASON_GENERATOR_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_VIEWER_TOKEN_INVALID: _ClassVar[ErrorReason]
    ERROR_REASON_VIEWER_ACTION_DENIED: _ClassVar[ErrorReason]
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_SESSION_NOT_FOUND: ErrorReason
ERROR_REASON_SESSION_NOT_ACTIVE: ErrorReason
ERROR_REASON_SESSION_EXPIRED: ErrorReason
ERROR_REASON_CATALOG_ITEM_NOT_FOUND: ErrorReason
ERROR_REASON_OBJECT_NOT_FOUND: ErrorReason
ERROR_REASON_IMAGE_INVALID: ErrorReason
ERROR_REASON_IMAGE_TOO_LARGE: ErrorReason
ERROR_REASON_RESOLUTION_UNSUPPORTED: ErrorReason
ERROR_REASON_PROMPT_INVALID: ErrorReason
ERROR_REASON_TENSOR_INVALID: ErrorReason
ERROR_REASON_PRESET_UNAVAILABLE: ErrorReason
ERROR_REASON_CAPACITY_EXHAUSTED: ErrorReason
ERROR_REASON_QUOTA_EXCEEDED: ErrorReason
ERROR_REASON_CHUNK_NOT_RETAINED: ErrorReason
ERROR_REASON_CHUNK_OUT_OF_ORDER: ErrorReason
ERROR_REASON_SESSION_NOT_ON_REPLICA: ErrorReason
ERROR_REASON_SESSION_LIMIT_REACHED: ErrorReason
ERROR_REASON_IDEMPOTENCY_KEY_REUSED: ErrorReason
ERROR_REASON_API_KEY_INVALID: ErrorReason
ERROR_REASON_FIELD_INVALID: ErrorReason
ERROR_REASON_REQUEST_MALFORMED: ErrorReason
ERROR_REASON_RESUME_PAST_END: ErrorReason
ERROR_REASON_GENERATOR_UNAVAILABLE: ErrorReason
ERROR_REASON_VIEWER_TOKEN_INVALID: ErrorReason
ERROR_REASON_VIEWER_ACTION_DENIED: ErrorReason

class ImageInput(_message.Message):
    __slots__ = ("data", "catalog_id", "object_key", "content_type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    CATALOG_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_KEY_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    catalog_id: str
    object_key: str
    content_type: str
    def __init__(self, data: _Optional[bytes] = ..., catalog_id: _Optional[str] = ..., object_key: _Optional[str] = ..., content_type: _Optional[str] = ...) -> None: ...

class SwitchOptions(_message.Message):
    __slots__ = ("refresh_garment_kv", "withdraw_history_kv", "disentangle_reference_kv")
    REFRESH_GARMENT_KV_FIELD_NUMBER: _ClassVar[int]
    WITHDRAW_HISTORY_KV_FIELD_NUMBER: _ClassVar[int]
    DISENTANGLE_REFERENCE_KV_FIELD_NUMBER: _ClassVar[int]
    refresh_garment_kv: bool
    withdraw_history_kv: bool
    disentangle_reference_kv: bool
    def __init__(self, refresh_garment_kv: _Optional[bool] = ..., withdraw_history_kv: _Optional[bool] = ..., disentangle_reference_kv: _Optional[bool] = ...) -> None: ...

class PromptOptions(_message.Message):
    __slots__ = ("recache_window",)
    RECACHE_WINDOW_FIELD_NUMBER: _ClassVar[int]
    recache_window: bool
    def __init__(self, recache_window: _Optional[bool] = ...) -> None: ...

class SessionOptions(_message.Message):
    __slots__ = ("seed", "max_chunks", "max_duration_seconds", "width", "height", "switch_options", "preset", "idle_timeout_seconds")
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SWITCH_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    seed: int
    max_chunks: int
    max_duration_seconds: float
    width: int
    height: int
    switch_options: SwitchOptions
    preset: str
    idle_timeout_seconds: float
    def __init__(self, seed: _Optional[int] = ..., max_chunks: _Optional[int] = ..., max_duration_seconds: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., switch_options: _Optional[_Union[SwitchOptions, _Mapping]] = ..., preset: _Optional[str] = ..., idle_timeout_seconds: _Optional[float] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...
