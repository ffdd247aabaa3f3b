from fashionchameleon.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VideoEncodeOptions(_message.Message):
    __slots__ = ("codec", "crf", "encoder_preset", "fps", "max_bitrate_bps")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CRF_FIELD_NUMBER: _ClassVar[int]
    ENCODER_PRESET_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    MAX_BITRATE_BPS_FIELD_NUMBER: _ClassVar[int]
    codec: str
    crf: int
    encoder_preset: str
    fps: float
    max_bitrate_bps: int
    def __init__(self, codec: _Optional[str] = ..., crf: _Optional[int] = ..., encoder_preset: _Optional[str] = ..., fps: _Optional[float] = ..., max_bitrate_bps: _Optional[int] = ...) -> None: ...

class DecodeChunkRequest(_message.Message):
    __slots__ = ("session_id", "chunk_index", "latents", "reset", "encode", "first_frame_index", "include_init_segment", "return_last_frame_png", "return_last_frame_tensor", "prime_latents", "idle_timeout_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    ENCODE_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_INIT_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    RETURN_LAST_FRAME_PNG_FIELD_NUMBER: _ClassVar[int]
    RETURN_LAST_FRAME_TENSOR_FIELD_NUMBER: _ClassVar[int]
    PRIME_LATENTS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    chunk_index: int
    latents: _common_pb2.Tensor
    reset: bool
    encode: VideoEncodeOptions
    first_frame_index: int
    include_init_segment: bool
    return_last_frame_png: bool
    return_last_frame_tensor: bool
    prime_latents: _common_pb2.Tensor
    idle_timeout_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., chunk_index: _Optional[int] = ..., latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., reset: _Optional[bool] = ..., encode: _Optional[_Union[VideoEncodeOptions, _Mapping]] = ..., first_frame_index: _Optional[int] = ..., include_init_segment: _Optional[bool] = ..., return_last_frame_png: _Optional[bool] = ..., return_last_frame_tensor: _Optional[bool] = ..., prime_latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., idle_timeout_seconds: _Optional[float] = ...) -> None: ...

class DecodeTimings(_message.Message):
    __slots__ = ("vae_decode_seconds", "video_encode_seconds", "total_seconds")
    VAE_DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    vae_decode_seconds: float
    video_encode_seconds: float
    total_seconds: float
    def __init__(self, vae_decode_seconds: _Optional[float] = ..., video_encode_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class DecodeChunkResponse(_message.Message):
    __slots__ = ("session_id", "chunk_index", "fmp4", "num_frames", "first_frame_index", "init_segment", "mime_type", "width", "height", "fps", "last_frame_png", "last_frame", "timings")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    FMP4_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    INIT_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    LAST_FRAME_PNG_FIELD_NUMBER: _ClassVar[int]
    LAST_FRAME_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    chunk_index: int
    fmp4: bytes
    num_frames: int
    first_frame_index: int
    init_segment: bytes
    mime_type: str
    width: int
    height: int
    fps: float
    last_frame_png: bytes
    last_frame: _common_pb2.Tensor
    timings: DecodeTimings
    def __init__(self, session_id: _Optional[str] = ..., chunk_index: _Optional[int] = ..., fmp4: _Optional[bytes] = ..., num_frames: _Optional[int] = ..., first_frame_index: _Optional[int] = ..., init_segment: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., fps: _Optional[float] = ..., last_frame_png: _Optional[bytes] = ..., last_frame: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., timings: _Optional[_Union[DecodeTimings, _Mapping]] = ...) -> None: ...

class DecoderCloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DecoderCloseSessionResponse(_message.Message):
    __slots__ = ("chunks_decoded", "freed_bytes")
    CHUNKS_DECODED_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    chunks_decoded: int
    freed_bytes: int
    def __init__(self, chunks_decoded: _Optional[int] = ..., freed_bytes: _Optional[int] = ...) -> None: ...
