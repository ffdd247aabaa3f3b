"""torch.Tensor <-> fashionchameleon.v1.Tensor (CPU bytes; layout in common.proto).

The wire form is the dtype name without "torch.", the shape (outermost first) and the elements
in C-contiguous order, little-endian, exactly prod(shape) * itemsize bytes. bfloat16 travels
as its raw 16-bit patterns (numpy has no bfloat16). Decoding validates everything a peer could
get wrong and raises `InvalidArgument` (reason TENSOR_INVALID) naming the field.

Text embeddings cross the wire trimmed: Wan's context is zero past the real tokens, so only
the first `num_tokens` rows are sent and the consumer pads back to the preset's length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NoReturn

import numpy as np
import torch

from fashionchameleon.v1 import common_pb2
from services.common.errors import InvalidArgument

MAX_RANK = 6
DEFAULT_MAX_TENSOR_BYTES = 256 * 2**20  # a 1280x704 bf16 frame is 5.4 MB, a latent far less

# dtype name -> (torch dtype, little-endian numpy dtype of the wire elements)
_WIRE: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype("<f4")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<i2")),  # raw bit patterns
    "uint8": (torch.uint8, np.dtype("u1")),
    "int32": (torch.int32, np.dtype("<i4")),
    "int64": (torch.int64, np.dtype("<i8")),
    "bool": (torch.bool, np.dtype("?")),
}
_NAME_OF = {torch_dtype: name for name, (torch_dtype, _) in _WIRE.items()}
DTYPES = tuple(_WIRE)


def tensor_to_proto(t: torch.Tensor) -> common_pb2.Tensor:
    """Serialize `t` (any device; copied to CPU, made contiguous, gradients dropped)."""
    name = _NAME_OF.get(t.dtype)
    if name is None:
        raise TypeError(f"dtype {t.dtype} cannot cross the wire; supported: {', '.join(DTYPES)}")
    cpu = t.detach().to("cpu").contiguous()
    if cpu.dtype == torch.bfloat16:
        cpu = cpu.view(torch.int16)
    wire_dtype = _WIRE[name][1]
    data = cpu.numpy().astype(wire_dtype, copy=False).tobytes()  # byte-swaps only on big-endian hosts
    return common_pb2.Tensor(dtype=name, shape=list(t.shape), data=data)


def tensor_from_proto(
    msg: common_pb2.Tensor,
    *,
    field: str = "tensor",
    expected_shape: Sequence[int | None] | None = None,
    dtypes: Sequence[str] | None = None,
    max_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
) -> torch.Tensor:
    """Decode a Tensor message into a new, writable CPU tensor.

    `field` names the message in errors (e.g. "embedding"); `expected_shape` may hold None for
    free dimensions (e.g. (1, None, 4096)); `dtypes` restricts the accepted dtype names;
    `max_bytes` bounds prod(shape) * itemsize before anything is allocated.
    """
    if msg.dtype not in _WIRE:
        _bad(field, f"unsupported dtype {msg.dtype!r}; expected one of {', '.join(DTYPES)}", dtype=msg.dtype)
    if dtypes is not None and msg.dtype not in dtypes:
        _bad(field, f"dtype is {msg.dtype}, expected {' or '.join(dtypes)}", dtype=msg.dtype)
    torch_dtype, wire_dtype = _WIRE[msg.dtype]
    shape = tuple(int(d) for d in msg.shape)
    if len(shape) > MAX_RANK:
        _bad(field, f"rank {len(shape)} is over the limit of {MAX_RANK}", shape=_fmt(shape))
    if any(d < 0 for d in shape):
        _bad(field, f"negative dimension in shape {_fmt(shape)}", shape=_fmt(shape))
    if expected_shape is not None and not _shape_matches(shape, expected_shape):
        want = "[" + ", ".join("*" if d is None else str(d) for d in expected_shape) + "]"
        _bad(field, f"shape is {_fmt(shape)}, expected {want}", shape=_fmt(shape), expected_shape=want)
    n_bytes = math.prod(shape) * wire_dtype.itemsize
    if n_bytes > max_bytes:
        _bad(field, f"{msg.dtype}{_fmt(shape)} is {n_bytes} bytes, over the limit of {max_bytes}", limit=max_bytes)
    if len(msg.data) != n_bytes:
        _bad(
            field,
            f"data is {len(msg.data)} bytes, expected {n_bytes} for {msg.dtype}{_fmt(shape)}",
            shape=_fmt(shape),
            expected_bytes=n_bytes,
        )
    values = np.frombuffer(msg.data, dtype=np.uint8 if msg.dtype == "bool" else wire_dtype)
    if msg.dtype == "bool":
        if values.size and values.max() > 1:
            _bad(field, "bool data holds bytes other than 0 and 1")
        values = values.view(np.bool_)
    native = values.astype(wire_dtype.newbyteorder("="), copy=True)  # owned, writable, native order
    t = torch.from_numpy(native).reshape(shape)
    return t.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else t


def trim_text_embedding(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Drop the trailing all-zero token rows of a text context.

    t: [1, L, D] -> ([1, n, D], n), n = 1 + index of the last row with a non-zero element
    (0 for an all-zero context). Zero rows before the last non-zero one are kept, so
    `pad_text_embedding(trimmed, L)` gives `t` back exactly.
    """
    if t.ndim != 3 or t.shape[0] != 1:
        raise ValueError(f"expected a text embedding [1, L, D], got {tuple(t.shape)}")
    nonzero_rows = (t[0] != 0).any(dim=-1)  # [L]
    idx = nonzero_rows.nonzero()  # [k, 1]
    n = int(idx[-1, 0]) + 1 if idx.numel() else 0
    return t[:, :n], n


def pad_text_embedding(t: torch.Tensor, length: int, *, field: str = "embedding") -> torch.Tensor:
    """Zero-pad a trimmed text context back to `length` tokens: [1, n, D] -> [1, length, D].

    Raises `InvalidArgument` when the tensor is not [1, n, D] or n > length (it came off the wire).
    """
    if t.ndim != 3 or t.shape[0] != 1:
        _bad(field, f"expected a text embedding [1, tokens, dim], got {_fmt(tuple(t.shape))}")
    n = t.shape[1]
    if n > length:
        _bad(field, f"{n} tokens is more than the maximum of {length}", limit=length)
    if n == length:
        return t
    out = t.new_zeros((1, length, t.shape[2]))  # [1, length, D]
    out[:, :n] = t
    return out


def _shape_matches(shape: tuple[int, ...], expected: Sequence[int | None]) -> bool:
    return len(shape) == len(expected) and all(e is None or d == e for d, e in zip(shape, expected))


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _bad(field: str, problem: str, **metadata: object) -> NoReturn:
    raise InvalidArgument(f"{field}: {problem}", reason="TENSOR_INVALID", metadata={"field": field, **metadata})
