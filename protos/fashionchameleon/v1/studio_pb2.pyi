import datetime

from fashionchameleon.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ViewerAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VIEWER_ACTION_UNSPECIFIED: _ClassVar[ViewerAction]
    VIEWER_ACTION_WATCH: _ClassVar[ViewerAction]
    VIEWER_ACTION_SWITCH_GARMENT: _ClassVar[ViewerAction]
    VIEWER_ACTION_UPDATE_PROMPT: _ClassVar[ViewerAction]
VIEWER_ACTION_UNSPECIFIED: ViewerAction
VIEWER_ACTION_WATCH: ViewerAction
VIEWER_ACTION_SWITCH_GARMENT: ViewerAction
VIEWER_ACTION_UPDATE_PROMPT: ViewerAction

class Session(_message.Message):
    __slots__ = ("session_id", "tenant", "state", "created_at", "expires_at", "idle_timeout_seconds", "chunks_generated", "garment_id", "width", "height", "fps", "preset", "seed", "prompt", "prompt_revision", "options", "frames_generated", "error_message")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Session.State]
        CREATING: _ClassVar[Session.State]
        ACTIVE: _ClassVar[Session.State]
        CLOSING: _ClassVar[Session.State]
        CLOSED: _ClassVar[Session.State]
        EXPIRED: _ClassVar[Session.State]
        FAILED: _ClassVar[Session.State]
    STATE_UNSPECIFIED: Session.State
    CREATING: Session.State
    ACTIVE: Session.State
    CLOSING: Session.State
    CLOSED: Session.State
    EXPIRED: Session.State
    FAILED: Session.State
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    GARMENT_ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_REVISION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_GENERATED_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tenant: str
    state: Session.State
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    idle_timeout_seconds: float
    chunks_generated: int
    garment_id: str
    width: int
    height: int
    fps: float
    preset: str
    seed: int
    prompt: str
    prompt_revision: int
    options: _common_pb2.SessionOptions
    frames_generated: int
    error_message: str
    def __init__(self, session_id: _Optional[str] = ..., tenant: _Optional[str] = ..., state: _Optional[_Union[Session.State, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., idle_timeout_seconds: _Optional[float] = ..., chunks_generated: _Optional[int] = ..., garment_id: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., fps: _Optional[float] = ..., preset: _Optional[str] = ..., seed: _Optional[int] = ..., prompt: _Optional[str] = ..., prompt_revision: _Optional[int] = ..., options: _Optional[_Union[_common_pb2.SessionOptions, _Mapping]] = ..., frames_generated: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("reference", "garment", "prompt", "options", "request_id")
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    GARMENT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    reference: _common_pb2.ImageInput
    garment: _common_pb2.ImageInput
    prompt: str
    options: _common_pb2.SessionOptions
    request_id: str
    def __init__(self, reference: _Optional[_Union[_common_pb2.ImageInput, _Mapping]] = ..., garment: _Optional[_Union[_common_pb2.ImageInput, _Mapping]] = ..., prompt: _Optional[str] = ..., options: _Optional[_Union[_common_pb2.SessionOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class StreamSessionRequest(_message.Message):
    __slots__ = ("session_id", "resume_from_index")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_INDEX_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    resume_from_index: int
    def __init__(self, session_id: _Optional[str] = ..., resume_from_index: _Optional[int] = ...) -> None: ...

class VideoChunk(_message.Message):
    __slots__ = ("index", "fmp4", "num_frames", "first_frame_index", "start_seconds", "duration_seconds", "fps", "width", "height", "garment_id", "prompt_revision", "switch_applied", "is_init_segment_included", "generated_at", "generation_latency_seconds", "end_of_stream", "end_state", "prompt_update_applied", "mime_type", "session_id")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FMP4_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    GARMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_REVISION_FIELD_NUMBER: _ClassVar[int]
    SWITCH_APPLIED_FIELD_NUMBER: _ClassVar[int]
    IS_INIT_SEGMENT_INCLUDED_FIELD_NUMBER: _ClassVar[int]
    GENERATED_AT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_LATENCY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    END_OF_STREAM_FIELD_NUMBER: _ClassVar[int]
    END_STATE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_UPDATE_APPLIED_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    index: int
    fmp4: bytes
    num_frames: int
    first_frame_index: int
    start_seconds: float
    duration_seconds: float
    fps: float
    width: int
    height: int
    garment_id: str
    prompt_revision: int
    switch_applied: bool
    is_init_segment_included: bool
    generated_at: _timestamp_pb2.Timestamp
    generation_latency_seconds: float
    end_of_stream: bool
    end_state: Session.State
    prompt_update_applied: bool
    mime_type: str
    session_id: str
    def __init__(self, index: _Optional[int] = ..., fmp4: _Optional[bytes] = ..., num_frames: _Optional[int] = ..., first_frame_index: _Optional[int] = ..., start_seconds: _Optional[float] = ..., duration_seconds: _Optional[float] = ..., fps: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., garment_id: _Optional[str] = ..., prompt_revision: _Optional[int] = ..., switch_applied: _Optional[bool] = ..., is_init_segment_included: _Optional[bool] = ..., generated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., generation_latency_seconds: _Optional[float] = ..., end_of_stream: _Optional[bool] = ..., end_state: _Optional[_Union[Session.State, str]] = ..., prompt_update_applied: _Optional[bool] = ..., mime_type: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class SwitchGarmentRequest(_message.Message):
    __slots__ = ("session_id", "garment", "options", "request_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GARMENT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    garment: _common_pb2.ImageInput
    options: _common_pb2.SwitchOptions
    request_id: str
    def __init__(self, session_id: _Optional[str] = ..., garment: _Optional[_Union[_common_pb2.ImageInput, _Mapping]] = ..., options: _Optional[_Union[_common_pb2.SwitchOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class SwitchGarmentResponse(_message.Message):
    __slots__ = ("effective_chunk_index", "garment_id")
    EFFECTIVE_CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    GARMENT_ID_FIELD_NUMBER: _ClassVar[int]
    effective_chunk_index: int
    garment_id: str
    def __init__(self, effective_chunk_index: _Optional[int] = ..., garment_id: _Optional[str] = ...) -> None: ...

class UpdatePromptRequest(_message.Message):
    __slots__ = ("session_id", "prompt", "request_id", "options")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt: str
    request_id: str
    options: _common_pb2.PromptOptions
    def __init__(self, session_id: _Optional[str] = ..., prompt: _Optional[str] = ..., request_id: _Optional[str] = ..., options: _Optional[_Union[_common_pb2.PromptOptions, _Mapping]] = ...) -> None: ...

class UpdatePromptResponse(_message.Message):
    __slots__ = ("effective_chunk_index", "prompt_revision")
    EFFECTIVE_CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_REVISION_FIELD_NUMBER: _ClassVar[int]
    effective_chunk_index: int
    prompt_revision: int
    def __init__(self, effective_chunk_index: _Optional[int] = ..., prompt_revision: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("state", "chunks_generated")
    STATE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    state: Session.State
    chunks_generated: int
    def __init__(self, state: _Optional[_Union[Session.State, str]] = ..., chunks_generated: _Optional[int] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ClipImage(_message.Message):
    __slots__ = ("image", "shared_index")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SHARED_INDEX_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.ImageInput
    shared_index: int
    def __init__(self, image: _Optional[_Union[_common_pb2.ImageInput, _Mapping]] = ..., shared_index: _Optional[int] = ...) -> None: ...

class GarmentAt(_message.Message):
    __slots__ = ("chunk_index", "garment")
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    GARMENT_FIELD_NUMBER: _ClassVar[int]
    chunk_index: int
    garment: ClipImage
    def __init__(self, chunk_index: _Optional[int] = ..., garment: _Optional[_Union[ClipImage, _Mapping]] = ...) -> None: ...

class ClipSpec(_message.Message):
    __slots__ = ("reference", "garments", "prompt", "chunks", "seed", "idempotency_key", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    GARMENTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    reference: ClipImage
    garments: _containers.RepeatedCompositeFieldContainer[GarmentAt]
    prompt: str
    chunks: int
    seed: int
    idempotency_key: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, reference: _Optional[_Union[ClipImage, _Mapping]] = ..., garments: _Optional[_Iterable[_Union[GarmentAt, _Mapping]]] = ..., prompt: _Optional[str] = ..., chunks: _Optional[int] = ..., seed: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SubmitClipsRequest(_message.Message):
    __slots__ = ("clips", "shared_images")
    CLIPS_FIELD_NUMBER: _ClassVar[int]
    SHARED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    clips: _containers.RepeatedCompositeFieldContainer[ClipSpec]
    shared_images: _containers.RepeatedCompositeFieldContainer[_common_pb2.ImageInput]
    def __init__(self, clips: _Optional[_Iterable[_Union[ClipSpec, _Mapping]]] = ..., shared_images: _Optional[_Iterable[_Union[_common_pb2.ImageInput, _Mapping]]] = ...) -> None: ...

class SubmitClipsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("video_key", "manifest_key", "poster_key", "video_url", "manifest_url", "poster_url", "urls_expire_at", "video_bytes", "frames", "fps", "width", "height")
    VIDEO_KEY_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_KEY_FIELD_NUMBER: _ClassVar[int]
    POSTER_KEY_FIELD_NUMBER: _ClassVar[int]
    VIDEO_URL_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_URL_FIELD_NUMBER: _ClassVar[int]
    POSTER_URL_FIELD_NUMBER: _ClassVar[int]
    URLS_EXPIRE_AT_FIELD_NUMBER: _ClassVar[int]
    VIDEO_BYTES_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    video_key: str
    manifest_key: str
    poster_key: str
    video_url: str
    manifest_url: str
    poster_url: str
    urls_expire_at: _timestamp_pb2.Timestamp
    video_bytes: int
    frames: int
    fps: float
    width: int
    height: int
    def __init__(self, video_key: _Optional[str] = ..., manifest_key: _Optional[str] = ..., poster_key: _Optional[str] = ..., video_url: _Optional[str] = ..., manifest_url: _Optional[str] = ..., poster_url: _Optional[str] = ..., urls_expire_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., video_bytes: _Optional[int] = ..., frames: _Optional[int] = ..., fps: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "tenant", "state", "idempotency_key", "created", "created_at", "updated_at", "started_at", "finished_at", "attempts", "max_attempts", "chunks_done", "chunks_total", "seed", "prompt", "labels", "error_message", "next_attempt_at", "result")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Job.State]
        QUEUED: _ClassVar[Job.State]
        RUNNING: _ClassVar[Job.State]
        RETRYING: _ClassVar[Job.State]
        CANCELLING: _ClassVar[Job.State]
        SUCCEEDED: _ClassVar[Job.State]
        FAILED: _ClassVar[Job.State]
        CANCELLED: _ClassVar[Job.State]
    STATE_UNSPECIFIED: Job.State
    QUEUED: Job.State
    RUNNING: Job.State
    RETRYING: Job.State
    CANCELLING: Job.State
    SUCCEEDED: Job.State
    FAILED: Job.State
    CANCELLED: Job.State
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_DONE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    tenant: str
    state: Job.State
    idempotency_key: str
    created: bool
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    attempts: int
    max_attempts: int
    chunks_done: int
    chunks_total: int
    seed: int
    prompt: str
    labels: _containers.ScalarMap[str, str]
    error_message: str
    next_attempt_at: _timestamp_pb2.Timestamp
    result: JobResult
    def __init__(self, job_id: _Optional[str] = ..., tenant: _Optional[str] = ..., state: _Optional[_Union[Job.State, str]] = ..., idempotency_key: _Optional[str] = ..., created: _Optional[bool] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[int] = ..., max_attempts: _Optional[int] = ..., chunks_done: _Optional[int] = ..., chunks_total: _Optional[int] = ..., seed: _Optional[int] = ..., prompt: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., error_message: _Optional[str] = ..., next_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., result: _Optional[_Union[JobResult, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "states")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[Job.State]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[Job.State, str]]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchJobsRequest(_message.Message):
    __slots__ = ("job_ids",)
    JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    job_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job", "event_id")
    JOB_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    job: Job
    event_id: str
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., event_id: _Optional[str] = ...) -> None: ...

class CreateViewerTokenRequest(_message.Message):
    __slots__ = ("session_id", "actions", "ttl_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    actions: _containers.RepeatedScalarFieldContainer[ViewerAction]
    ttl_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., actions: _Optional[_Iterable[_Union[ViewerAction, str]]] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class CreateViewerTokenResponse(_message.Message):
    __slots__ = ("token", "expires_at", "actions", "player_path")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    PLAYER_PATH_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_at: _timestamp_pb2.Timestamp
    actions: _containers.RepeatedScalarFieldContainer[ViewerAction]
    player_path: str
    def __init__(self, token: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actions: _Optional[_Iterable[_Union[ViewerAction, str]]] = ..., player_path: _Optional[str] = ...) -> None: ...
