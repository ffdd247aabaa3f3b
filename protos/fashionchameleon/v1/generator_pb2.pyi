import datetime

from fashionchameleon.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionState(_message.Message):
    __slots__ = ("session_id", "preset", "width", "height", "seed", "next_chunk_index", "latent_frames_generated", "reference_latent", "garment_latent", "garment_id", "last_frame_latent", "last_frame_png", "prompt_embedding", "prompt", "prompt_revision", "switch_options", "sink_chunk_index", "saved_at")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NEXT_CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    LATENT_FRAMES_GENERATED_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_LATENT_FIELD_NUMBER: _ClassVar[int]
    GARMENT_LATENT_FIELD_NUMBER: _ClassVar[int]
    GARMENT_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_FRAME_LATENT_FIELD_NUMBER: _ClassVar[int]
    LAST_FRAME_PNG_FIELD_NUMBER: _ClassVar[int]
    PROMPT_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_REVISION_FIELD_NUMBER: _ClassVar[int]
    SWITCH_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SINK_CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    SAVED_AT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    preset: str
    width: int
    height: int
    seed: int
    next_chunk_index: int
    latent_frames_generated: int
    reference_latent: _common_pb2.Tensor
    garment_latent: _common_pb2.Tensor
    garment_id: str
    last_frame_latent: _common_pb2.Tensor
    last_frame_png: bytes
    prompt_embedding: _common_pb2.Tensor
    prompt: str
    prompt_revision: int
    switch_options: _common_pb2.SwitchOptions
    sink_chunk_index: int
    saved_at: _timestamp_pb2.Timestamp
    def __init__(self, session_id: _Optional[str] = ..., preset: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., seed: _Optional[int] = ..., next_chunk_index: _Optional[int] = ..., latent_frames_generated: _Optional[int] = ..., reference_latent: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., garment_latent: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., garment_id: _Optional[str] = ..., last_frame_latent: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., last_frame_png: _Optional[bytes] = ..., prompt_embedding: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., prompt: _Optional[str] = ..., prompt_revision: _Optional[int] = ..., switch_options: _Optional[_Union[_common_pb2.SwitchOptions, _Mapping]] = ..., sink_chunk_index: _Optional[int] = ..., saved_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GeneratorCapacity(_message.Message):
    __slots__ = ("replica_id", "kv_cache_budget_bytes", "kv_cache_bytes", "free_bytes", "active_sessions", "max_sessions", "session_kv_cache_bytes", "realtime_sessions", "realtime_headroom")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SESSION_KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REALTIME_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    REALTIME_HEADROOM_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    kv_cache_budget_bytes: int
    kv_cache_bytes: int
    free_bytes: int
    active_sessions: int
    max_sessions: int
    session_kv_cache_bytes: int
    realtime_sessions: int
    realtime_headroom: float
    def __init__(self, replica_id: _Optional[str] = ..., kv_cache_budget_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., active_sessions: _Optional[int] = ..., max_sessions: _Optional[int] = ..., session_kv_cache_bytes: _Optional[int] = ..., realtime_sessions: _Optional[int] = ..., realtime_headroom: _Optional[float] = ...) -> None: ...

class GeneratorOpenSessionRequest(_message.Message):
    __slots__ = ("state", "replace_existing")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REPLACE_EXISTING_FIELD_NUMBER: _ClassVar[int]
    state: SessionState
    replace_existing: bool
    def __init__(self, state: _Optional[_Union[SessionState, _Mapping]] = ..., replace_existing: _Optional[bool] = ...) -> None: ...

class GeneratorOpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "replica_id", "next_chunk_index", "session_kv_cache_bytes", "cond_seconds", "capacity")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    SESSION_KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    COND_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    replica_id: str
    next_chunk_index: int
    session_kv_cache_bytes: int
    cond_seconds: float
    capacity: GeneratorCapacity
    def __init__(self, session_id: _Optional[str] = ..., replica_id: _Optional[str] = ..., next_chunk_index: _Optional[int] = ..., session_kv_cache_bytes: _Optional[int] = ..., cond_seconds: _Optional[float] = ..., capacity: _Optional[_Union[GeneratorCapacity, _Mapping]] = ...) -> None: ...

class GeneratorNextChunkRequest(_message.Message):
    __slots__ = ("session_id", "chunk_index")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    chunk_index: int
    def __init__(self, session_id: _Optional[str] = ..., chunk_index: _Optional[int] = ...) -> None: ...

class GeneratorNextChunkResponse(_message.Message):
    __slots__ = ("session_id", "chunk_index", "latents", "first_latent_frame_index", "garment_id", "prompt_revision", "switch_applied", "prompt_update_applied", "generation_seconds", "session_kv_cache_bytes", "capacity")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    FIRST_LATENT_FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    GARMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_REVISION_FIELD_NUMBER: _ClassVar[int]
    SWITCH_APPLIED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_UPDATE_APPLIED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    chunk_index: int
    latents: _common_pb2.Tensor
    first_latent_frame_index: int
    garment_id: str
    prompt_revision: int
    switch_applied: bool
    prompt_update_applied: bool
    generation_seconds: float
    session_kv_cache_bytes: int
    capacity: GeneratorCapacity
    def __init__(self, session_id: _Optional[str] = ..., chunk_index: _Optional[int] = ..., latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., first_latent_frame_index: _Optional[int] = ..., garment_id: _Optional[str] = ..., prompt_revision: _Optional[int] = ..., switch_applied: _Optional[bool] = ..., prompt_update_applied: _Optional[bool] = ..., generation_seconds: _Optional[float] = ..., session_kv_cache_bytes: _Optional[int] = ..., capacity: _Optional[_Union[GeneratorCapacity, _Mapping]] = ...) -> None: ...

class GeneratorSwitchGarmentRequest(_message.Message):
    __slots__ = ("session_id", "effective_chunk_index", "garment_latent", "garment_id", "reference_latent", "options")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    GARMENT_LATENT_FIELD_NUMBER: _ClassVar[int]
    GARMENT_ID_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_LATENT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    effective_chunk_index: int
    garment_latent: _common_pb2.Tensor
    garment_id: str
    reference_latent: _common_pb2.Tensor
    options: _common_pb2.SwitchOptions
    def __init__(self, session_id: _Optional[str] = ..., effective_chunk_index: _Optional[int] = ..., garment_latent: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., garment_id: _Optional[str] = ..., reference_latent: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., options: _Optional[_Union[_common_pb2.SwitchOptions, _Mapping]] = ...) -> None: ...

class GeneratorSwitchGarmentResponse(_message.Message):
    __slots__ = ("effective_chunk_index", "garment_id", "cond_seconds")
    EFFECTIVE_CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    GARMENT_ID_FIELD_NUMBER: _ClassVar[int]
    COND_SECONDS_FIELD_NUMBER: _ClassVar[int]
    effective_chunk_index: int
    garment_id: str
    cond_seconds: float
    def __init__(self, effective_chunk_index: _Optional[int] = ..., garment_id: _Optional[str] = ..., cond_seconds: _Optional[float] = ...) -> None: ...

class GeneratorSetPromptRequest(_message.Message):
    __slots__ = ("session_id", "effective_chunk_index", "prompt_embedding", "prompt", "prompt_revision")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_REVISION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    effective_chunk_index: int
    prompt_embedding: _common_pb2.Tensor
    prompt: str
    prompt_revision: int
    def __init__(self, session_id: _Optional[str] = ..., effective_chunk_index: _Optional[int] = ..., prompt_embedding: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., prompt: _Optional[str] = ..., prompt_revision: _Optional[int] = ...) -> None: ...

class GeneratorSetPromptResponse(_message.Message):
    __slots__ = ("effective_chunk_index", "prompt_revision")
    EFFECTIVE_CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_REVISION_FIELD_NUMBER: _ClassVar[int]
    effective_chunk_index: int
    prompt_revision: int
    def __init__(self, effective_chunk_index: _Optional[int] = ..., prompt_revision: _Optional[int] = ...) -> None: ...

class GeneratorCloseSessionRequest(_message.Message):
    __slots__ = ("session_id", "return_state")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RETURN_STATE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    return_state: bool
    def __init__(self, session_id: _Optional[str] = ..., return_state: _Optional[bool] = ...) -> None: ...

class GeneratorCloseSessionResponse(_message.Message):
    __slots__ = ("chunks_generated", "freed_bytes", "state", "capacity")
    CHUNKS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    chunks_generated: int
    freed_bytes: int
    state: SessionState
    capacity: GeneratorCapacity
    def __init__(self, chunks_generated: _Optional[int] = ..., freed_bytes: _Optional[int] = ..., state: _Optional[_Union[SessionState, _Mapping]] = ..., capacity: _Optional[_Union[GeneratorCapacity, _Mapping]] = ...) -> None: ...

class GeneratorGetSessionStateRequest(_message.Message):
    __slots__ = ("session_id", "include_tensors")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TENSORS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    include_tensors: bool
    def __init__(self, session_id: _Optional[str] = ..., include_tensors: _Optional[bool] = ...) -> None: ...

class GeneratorGetSessionStateResponse(_message.Message):
    __slots__ = ("state", "session_kv_cache_bytes", "capacity")
    STATE_FIELD_NUMBER: _ClassVar[int]
    SESSION_KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    state: SessionState
    session_kv_cache_bytes: int
    capacity: GeneratorCapacity
    def __init__(self, state: _Optional[_Union[SessionState, _Mapping]] = ..., session_kv_cache_bytes: _Optional[int] = ..., capacity: _Optional[_Union[GeneratorCapacity, _Mapping]] = ...) -> None: ...
