"""H.264 MP4 writing, probing and decoding with PyAV.

Frames are uint8 RGB arrays, ``[H, W, 3]`` or ``[T, H, W, 3]``, as numpy arrays or torch tensors
(any object with ``.detach().cpu().numpy()``; torch is never imported here).

Odd sizes: H.264 with 4:2:0 chroma cannot represent an odd width or height (even the SPS
cropping window moves in steps of 2), so frames with an odd dimension are padded to the next
even size by replicating the last column / row (:func:`pad_to_even`). The written video is
then one pixel wider and/or taller than the input; ``probe_video`` reports the padded size.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import av
import numpy as np

PathOrBytes = str | Path | bytes | bytearray | memoryview

__all__ = [
    "Mp4Writer",
    "VideoInfo",
    "as_frame_batch",
    "fps_fraction",
    "iter_frame_batches",
    "pad_to_even",
    "probe_video",
    "read_frames",
    "write_mp4",
]


def fps_fraction(fps: float | Fraction) -> Fraction:
    """Frame rate as an exact fraction (29.97 -> 30000/1001)."""
    fr = Fraction(fps).limit_denominator(1001)
    if fr <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    return fr


def as_frame_batch(frames: Any) -> np.ndarray:
    """One array / tensor of frames -> contiguous uint8 numpy ``[T, H, W, 3]``."""
    if hasattr(frames, "detach"):  # torch.Tensor
        frames = frames.detach().cpu().numpy()
    arr = np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected frames shaped [H,W,3] or [T,H,W,3], got {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {arr.dtype}")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"empty frame size {arr.shape[1:3]}")
    return np.ascontiguousarray(arr)


def iter_frame_batches(frames: Any) -> Iterator[np.ndarray]:
    """Accept one batch (array/tensor) or an iterable of single frames / batches."""
    if isinstance(frames, np.ndarray) or hasattr(frames, "detach"):
        yield as_frame_batch(frames)
        return
    for item in frames:
        yield as_frame_batch(item)


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pad ``[T, H, W, 3]`` to even H and W by edge replication (no copy if already even)."""
    _, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if not (ph or pw):
        return frames
    return np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")


def _x264_options(crf: int, preset: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    opts = {"crf": str(crf), "preset": preset}
    opts.update(extra or {})
    return opts


class Mp4Writer:
    """Streaming H.264 (libx264, yuv420p) MP4 writer; frames may arrive chunk by chunk.

    The frame size is taken from the first frame written; later frames must match it.
    Frame ``i`` gets timestamp ``i / fps``. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | Path, fps: float | Fraction = 24, crf: int = 18, preset: str = "veryfast") -> None:
        self.path = Path(path)
        self.fps = fps_fraction(fps)
        self.crf = crf
        self.preset = preset
        self.frames_written = 0
        self._size: tuple[int, int] | None = None  # (H, W) as given, before padding
        self._container: Any = None
        self._stream: Any = None
        self._closed = False

    def _open(self, height: int, width: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w", format="mp4")
        stream = self._container.add_stream("libx264", rate=self.fps)
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / self.fps
        stream.options = _x264_options(self.crf, self.preset)
        self._stream = stream
        self._size = (height, width)

    def write(self, frames: Any) -> int:
        """Encode frames (one array/tensor ``[H,W,3]``/``[T,H,W,3]`` or an iterable of them)."""
        if self._closed:
            raise ValueError("Mp4Writer is closed")
        n = 0
        for batch in iter_frame_batches(frames):
            if self._size is None:
                self._open(batch.shape[1], batch.shape[2])
            if batch.shape[1:3] != self._size:
                raise ValueError(f"frame size {batch.shape[1:3]} != first frame size {self._size}")
            for img in pad_to_even(batch):
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                frame.pts = self.frames_written
                self._container.mux(self._stream.encode(frame))
                self.frames_written += 1
                n += 1
        return n

    def close(self) -> None:
        """Flush the encoder and finalize the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._container is None:
            raise ValueError("Mp4Writer closed without any frame; nothing was written")
        try:
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._container is None and exc_type is not None:
            self._closed = True  # nothing opened; keep the original exception
            return
        self.close()


def write_mp4(
    frames: Any,
    path: str | Path,
    fps: float | Fraction = 24,
    crf: int = 18,
    preset: str = "veryfast",
) -> int:
    """Write frames as an H.264 (libx264, yuv420p) MP4; returns the number of frames written.

    ``frames``: uint8 ``[T,H,W,3]`` / ``[H,W,3]`` array or tensor, or an iterable of those.
    Odd sizes are padded to even by edge replication (see module docstring).
    """
    with Mp4Writer(path, fps=fps, crf=crf, preset=preset) as writer:
        writer.write(frames)
    return writer.frames_written


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    width: int
    height: int
    fps: float
    codec: str
    duration_seconds: float


def _open_input(src: PathOrBytes) -> Any:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return av.open(io.BytesIO(bytes(src)), mode="r")
    return av.open(str(src), mode="r")


def probe_video(src: PathOrBytes) -> VideoInfo:
    """Frame count (demuxed packets, exact also for fragmented MP4), size, fps, codec, duration."""
    with _open_input(src) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        count, first, last_end = 0, None, None
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            count += 1
            if packet.pts is not None:
                end = packet.pts + (packet.duration or 0)
                first = packet.pts if first is None else min(first, packet.pts)
                last_end = end if last_end is None else max(last_end, end)
        if first is not None and last_end is not None and last_end > first and stream.time_base:
            duration = float((last_end - first) * stream.time_base)
        else:
            duration = count / fps if fps else 0.0
        ctx = stream.codec_context
        return VideoInfo(count, ctx.width, ctx.height, fps, ctx.name, duration)


def read_frames(src: PathOrBytes) -> np.ndarray:
    """Decode every frame to uint8 RGB ``[T, H, W, 3]`` (in presentation order)."""
    with _open_input(src) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        if not frames:
            ctx = stream.codec_context
            return np.zeros((0, ctx.height, ctx.width, 3), np.uint8)
        return np.stack(frames)
