from fashionchameleon.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_KIND_UNSPECIFIED: _ClassVar[ImageKind]
    IMAGE_KIND_REFERENCE: _ClassVar[ImageKind]
    IMAGE_KIND_GARMENT: _ClassVar[ImageKind]
    IMAGE_KIND_FRAME: _ClassVar[ImageKind]
IMAGE_KIND_UNSPECIFIED: ImageKind
IMAGE_KIND_REFERENCE: ImageKind
IMAGE_KIND_GARMENT: ImageKind
IMAGE_KIND_FRAME: ImageKind

class EncodeImageRequest(_message.Message):
    __slots__ = ("image", "pixels", "kind", "height", "width")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.ImageInput
    pixels: _common_pb2.Tensor
    kind: ImageKind
    height: int
    width: int
    def __init__(self, image: _Optional[_Union[_common_pb2.ImageInput, _Mapping]] = ..., pixels: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., kind: _Optional[_Union[ImageKind, str]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class EncodeImageResponse(_message.Message):
    __slots__ = ("latent", "content_hash", "cache_hit", "encode_seconds")
    LATENT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    latent: _common_pb2.Tensor
    content_hash: str
    cache_hit: bool
    encode_seconds: float
    def __init__(self, latent: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., content_hash: _Optional[str] = ..., cache_hit: _Optional[bool] = ..., encode_seconds: _Optional[float] = ...) -> None: ...

class EncodePromptRequest(_message.Message):
    __slots__ = ("prompt",)
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    def __init__(self, prompt: _Optional[str] = ...) -> None: ...

class EncodePromptResponse(_message.Message):
    __slots__ = ("embedding", "content_hash", "cache_hit", "num_tokens", "encode_seconds")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    embedding: _common_pb2.Tensor
    content_hash: str
    cache_hit: bool
    num_tokens: int
    encode_seconds: float
    def __init__(self, embedding: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., content_hash: _Optional[str] = ..., cache_hit: _Optional[bool] = ..., num_tokens: _Optional[int] = ..., encode_seconds: _Optional[float] = ...) -> None: ...
