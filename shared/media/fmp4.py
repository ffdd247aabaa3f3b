"""Fragmented MP4 (ISO-BMFF) H.264 muxer for live streaming to browsers (Media Source Extensions).

Why a hand-written muxer: FFmpeg's mp4 muxer (movenc) only closes a fragment when the *next*
packet arrives, at an explicit ``av_write_frame(ctx, NULL)`` (not exposed by PyAV) or at the
trailer, so a chunk's moof+mdat would be held back until the following chunk. Here PyAV/libx264
only encodes (``tune=zerolatency``: no B-frames, no lookahead, one packet out per frame in) and
the boxes are written directly, so every :meth:`FragmentedMp4Muxer.add_chunk` returns its whole
fragment at once.

Layout: ``ftyp moov(mvhd trak mvex)`` init segment, then one ``moof(mfhd traf(tfhd tfdt trun))
mdat`` per chunk; tfhd uses default-base-is-moof (needs the ``iso6`` brand). Samples are
length-prefixed NAL units (avcC, 4-byte lengths); SPS/PPS are moved into the avcC box. Every
chunk starts with a forced IDR frame and contains no other keyframe. Frame ``i`` has decode and
presentation time ``(start_frame + i) / fps`` (``start_frame`` lets a muxer that replaces another
mid-stream, after a decoder reset, continue the timeline). Odd frame sizes are padded to even (see ``video.pad_to_even``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import av
from av.video.frame import PictureType

from .video import as_frame_batch, fps_fraction, pad_to_even

__all__ = ["FragmentedMp4Muxer", "iter_boxes", "split_init_segment"]

_TRACK_ID = 1
_SYNC_FLAGS = 0x02000000  # sample_depends_on=2 (I picture), is_non_sync=0
_NON_SYNC_FLAGS = 0x01010000  # sample_depends_on=1, is_non_sync=1
_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def iter_boxes(
    data: bytes | bytearray | memoryview, offset: int = 0, end: int | None = None
) -> Iterator[tuple[str, int, int]]:
    """Top-level ISO-BMFF boxes in ``data[offset:end]`` as ``(type, offset, size)``.

    Handles 64-bit ``largesize`` and size 0 (box runs to the end). Raises ValueError on a
    truncated or malformed box. For children, call again with the parent's payload range.
    """
    buf = memoryview(data)
    end = len(buf) if end is None else end
    pos = offset
    while pos < end:
        if end - pos < 8:
            raise ValueError(f"truncated box header at offset {pos}")
        size, kind = struct.unpack_from(">I4s", buf, pos)
        header = 8
        if size == 1:
            if end - pos < 16:
                raise ValueError(f"truncated largesize header at offset {pos}")
            (size,) = struct.unpack_from(">Q", buf, pos + 8)
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise ValueError(f"bad box size {size} for {kind!r} at offset {pos}")
        yield kind.decode("latin-1"), pos, size
        pos += size


def split_init_segment(data: bytes) -> tuple[bytes, bytes]:
    """Split fMP4 bytes into (init segment = everything up to and including moov, media)."""
    for kind, off, size in iter_boxes(data):
        if kind == "moov":
            return bytes(data[: off + size]), bytes(data[off + size :])
    raise ValueError("no moov box: not an MP4 init segment")


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def _split_annexb(data: bytes) -> list[bytes]:
    """Annex B byte stream -> NAL units without start codes (3- or 4-byte codes)."""
    nals: list[bytes] = []
    start = data.find(b"\x00\x00\x01")
    while start >= 0:
        start += 3
        nxt = data.find(b"\x00\x00\x01", start)
        nal = data[start:] if nxt < 0 else data[start:nxt]
        if nxt >= 0:
            nal = nal.rstrip(b"\x00")  # leading zero of a 4-byte start code / trailing zero padding
        if nal:
            nals.append(nal)
        start = nxt
    return nals


class FragmentedMp4Muxer:
    """Chunk-wise H.264 fMP4 muxer: ``add_chunk`` returns that chunk's bytes immediately.

    The first non-empty ``add_chunk`` result starts with the init segment (ftyp+moov); every
    result is then exactly one ``moof+mdat`` fragment holding the chunk's frames, the first of
    which is an IDR keyframe. ``close()`` returns any remaining bytes (normally ``b""``).
    """

    def __init__(
        self,
        width: int,
        height: int,
        fps: float | Fraction = 24,
        crf: int = 23,
        preset: str = "veryfast",
        *,
        start_frame: int = 0,
        start_sequence: int = 0,
    ) -> None:
        """``start_frame``: index of the first frame in the stream's timeline (a muxer that takes
        over mid-stream continues the decode times: tfdt = frame index / fps).
        ``start_sequence``: fragments already written (mfhd sequence numbers continue after it)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"bad frame size {width}x{height}")
        self.width, self.height = width, height
        self.coded_width, self.coded_height = width + width % 2, height + height % 2
        self.fps = fps_fraction(fps)
        scale = 1 if self.fps.numerator >= 1000 else 1000
        self.timescale = self.fps.numerator * scale
        self.sample_duration = self.fps.denominator * scale
        if start_frame < 0 or start_sequence < 0:
            raise ValueError(f"bad start_frame {start_frame} / start_sequence {start_sequence}")
        self.frames_in = 0
        self.start_frame = int(start_frame)
        self._samples_out = 0
        self._sequence = int(start_sequence)
        self._init_sent = False
        self._closed = False
        self._sps: bytes | None = None
        self._pps: bytes | None = None
        ctx: Any = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height, ctx.pix_fmt = self.coded_width, self.coded_height, "yuv420p"
        ctx.time_base = 1 / self.fps
        ctx.framerate = self.fps
        ctx.options = {
            "crf": str(crf),
            "preset": preset,
            "tune": "zerolatency",  # bframes=0, rc-lookahead=0, sliced threads: no frame delay
            "forced-idr": "1",  # pict_type=I becomes an IDR, not an open-GOP I frame
            "x264-params": "keyint=infinite:scenecut=0",  # keyframes only where forced
        }
        ctx.open()
        self._ctx = ctx

    @property
    def mime_type(self) -> str:
        """MSE type string, e.g. ``video/mp4; codecs="avc1.64001f"`` (known after the first chunk)."""
        if self._sps is None:
            raise ValueError("codec string is known after the first chunk")
        return f'video/mp4; codecs="avc1.{self._sps[1:4].hex()}"'

    def add_chunk(self, frames: Any) -> bytes:
        """Encode ``[T,H,W,3]`` / ``[H,W,3]`` uint8 frames as one fragment (IDR first)."""
        if self._closed:
            raise ValueError("muxer is closed")
        batch = as_frame_batch(frames)
        if batch.shape[1:3] != (self.height, self.width):
            raise ValueError(f"frame size {batch.shape[1:3]} != ({self.height}, {self.width})")
        packets: list[Any] = []
        for j, img in enumerate(pad_to_even(batch)):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = self.frames_in
            if j == 0:
                frame.pict_type = PictureType.I
            packets.extend(self._ctx.encode(frame))
            self.frames_in += 1
        return self._emit(packets)

    def close(self) -> bytes:
        """Flush the encoder; returns trailing fragment bytes (normally empty). Idempotent."""
        if self._closed:
            return b""
        self._closed = True
        return self._emit(list(self._ctx.encode(None)))

    # -- boxes -------------------------------------------------------------------------------

    def _emit(self, packets: list[Any]) -> bytes:
        samples: list[tuple[bytes, bool]] = []
        for packet in packets:
            nals = []
            for nal in _split_annexb(bytes(packet)):
                nal_type = nal[0] & 0x1F
                if nal_type == 7:
                    self._sps = self._sps or nal
                elif nal_type == 8:
                    self._pps = self._pps or nal
                elif nal_type != 9:  # drop access unit delimiters too
                    nals.append(struct.pack(">I", len(nal)) + nal)
            samples.append((b"".join(nals), bool(packet.is_keyframe)))
        if not samples:
            return b""
        out = b""
        if not self._init_sent:
            out = self._init_segment()
            self._init_sent = True
        return out + self._fragment(samples)

    def _init_segment(self) -> bytes:
        if self._sps is None or self._pps is None:
            raise RuntimeError("encoder produced no SPS/PPS before the first sample")
        sps, pps = self._sps, self._pps
        ftyp = _box(b"ftyp", b"isom", struct.pack(">I", 0x200), b"isomiso6avc1mp41")
        mvhd = _full_box(
            b"mvhd",
            0,
            0,
            struct.pack(">IIII", 0, 0, self.timescale, 0),
            struct.pack(">IH", 0x10000, 0x100),
            bytes(10),
            _MATRIX,
            bytes(24),
            struct.pack(">I", _TRACK_ID + 1),
        )
        tkhd = _full_box(
            b"tkhd",
            0,
            3,  # enabled | in movie
            struct.pack(">IIIII", 0, 0, _TRACK_ID, 0, 0),
            bytes(8),
            struct.pack(">hhhH", 0, 0, 0, 0),
            _MATRIX,
            struct.pack(">II", self.coded_width << 16, self.coded_height << 16),
        )
        mdhd = _full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, self.timescale, 0, 0x55C4, 0))
        hdlr = _full_box(b"hdlr", 0, 0, struct.pack(">I4s", 0, b"vide"), bytes(12), b"VideoHandler\x00")
        avcc_tail = b""
        if sps[0] & 0x1F == 7 and sps[1] in (100, 110, 122, 144):  # High profiles: 4:2:0, 8 bit
            avcc_tail = bytes([0xFC | 1, 0xF8, 0xF8, 0])
        avcc = _box(
            b"avcC",
            bytes([1, sps[1], sps[2], sps[3], 0xFF, 0xE1]),
            struct.pack(">H", len(sps)),
            sps,
            bytes([1]),
            struct.pack(">H", len(pps)),
            pps,
            avcc_tail,
        )
        avc1 = _box(
            b"avc1",
            bytes(6),
            struct.pack(">H", 1),
            bytes(16),
            struct.pack(">HHIIIH", self.coded_width, self.coded_height, 0x480000, 0x480000, 0, 1),
            bytes(32),
            struct.pack(">Hh", 0x18, -1),
            avcc,
        )
        stbl = _box(
            b"stbl",
            _full_box(b"stsd", 0, 0, struct.pack(">I", 1), avc1),
            _full_box(b"stts", 0, 0, struct.pack(">I", 0)),
            _full_box(b"stsc", 0, 0, struct.pack(">I", 0)),
            _full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0)),
            _full_box(b"stco", 0, 0, struct.pack(">I", 0)),
        )
        dinf = _box(b"dinf", _full_box(b"dref", 0, 0, struct.pack(">I", 1), _full_box(b"url ", 0, 1)))
        minf = _box(b"minf", _full_box(b"vmhd", 0, 1, bytes(8)), dinf, stbl)
        trak = _box(b"trak", tkhd, _box(b"mdia", mdhd, hdlr, minf))
        trex = _full_box(b"trex", 0, 0, struct.pack(">IIIII", _TRACK_ID, 1, 0, 0, 0))
        return ftyp + _box(b"moov", mvhd, trak, _box(b"mvex", trex))

    def _fragment(self, samples: list[tuple[bytes, bool]]) -> bytes:
        self._sequence += 1
        mfhd = _full_box(b"mfhd", 0, 0, struct.pack(">I", self._sequence))
        # default-base-is-moof | default-sample-duration
        tfhd = _full_box(b"tfhd", 0, 0x020008, struct.pack(">II", _TRACK_ID, self.sample_duration))
        tfdt = _full_box(
            b"tfdt", 1, 0, struct.pack(">Q", (self.start_frame + self._samples_out) * self.sample_duration)
        )
        entries = b"".join(
            struct.pack(">II", len(data), _SYNC_FLAGS if key else _NON_SYNC_FLAGS) for data, key in samples
        )

        def moof(data_offset: int) -> bytes:
            # data-offset | sample-size | sample-flags
            trun = _full_box(b"trun", 0, 0x000601, struct.pack(">Ii", len(samples), data_offset), entries)
            return _box(b"moof", mfhd, _box(b"traf", tfhd, tfdt, trun))

        moof_size = len(moof(0))
        mdat = _box(b"mdat", *(data for data, _ in samples))
        self._samples_out += len(samples)
        return moof(moof_size + 8) + mdat
