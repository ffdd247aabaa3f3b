"""shared.media: MP4 writing/probing/decoding and the live fragmented-MP4 muxer (CPU, seconds)."""

from __future__ import annotations

import io
import itertools
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from shared.media.fmp4 import FragmentedMp4Muxer, iter_boxes, split_init_segment
from shared.media.video import Mp4Writer, pad_to_even, probe_video, read_frames, write_mp4

CHUNKS = (9, 12, 12, 12)


def smooth_frames(n: int, start: int = 0, h: int = 96, w: int = 128) -> np.ndarray:
    """Smooth, moving gradients with a little noise: uint8 [n, h, w, 3]."""
    rng = np.random.default_rng(start)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for t in range(start, start + n):
        r = 128 + 100 * np.sin((x + 2 * t) / 17.0)
        g = 128 + 100 * np.cos((y - 3 * t) / 13.0)
        b = 128 + 60 * np.sin((x + y + 5 * t) / 23.0)
        img = np.stack([r, g, b], -1) + rng.normal(0, 2, (h, w, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def decode(data: bytes) -> tuple[list[av.VideoFrame], int, Fraction]:
    """Decoded frames, number of keyframe packets and the stream time base."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.size]
        keys = sum(p.is_keyframe for p in packets)
        frames = [f for p in packets for f in p.decode()]
        frames += list(stream.codec_context.decode(None))
        return frames, keys, stream.time_base


def child_boxes(data: bytes, offset: int, size: int, header: int = 8) -> dict[str, tuple[int, int]]:
    return {k: (o, s) for k, o, s in iter_boxes(data, offset + header, offset + size)}


def trun_sample_count(piece: bytes) -> int:
    total = 0
    for kind, off, size in iter_boxes(piece):
        if kind == "moof":
            traf = child_boxes(piece, off, size)["traf"]
            trun_off, _ = child_boxes(piece, *traf)["trun"]
            total += struct.unpack_from(">I", piece, trun_off + 12)[0]
    return total


# -- write_mp4 / probe_video / read_frames ---------------------------------------------------


def test_write_mp4_probe_and_read(tmp_path: Path) -> None:
    frames = smooth_frames(9 + 12 * 3)
    path = tmp_path / "out.mp4"
    assert write_mp4(frames, path) == 45
    info = probe_video(path)
    assert info.num_frames == 45
    assert info.fps == pytest.approx(24.0)
    assert info.codec == "h264"
    assert (info.width, info.height) == (128, 96)
    assert info.duration_seconds == pytest.approx(45 / 24, abs=1e-3)
    assert probe_video(path.read_bytes()) == info  # bytes input
    decoded = read_frames(path)
    assert decoded.shape == (45, 96, 128, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(np.int16) - frames).mean() < 6


def test_write_mp4_accepts_torch_and_single_frames(tmp_path: Path) -> None:
    frames = smooth_frames(5)
    assert write_mp4(torch.from_numpy(frames), tmp_path / "t.mp4", fps=30) == 5
    assert write_mp4(iter(frames), tmp_path / "it.mp4") == 5  # iterable of [H,W,3]
    assert probe_video(tmp_path / "t.mp4").fps == pytest.approx(30.0)
    assert probe_video(tmp_path / "it.mp4").num_frames == 5


@pytest.mark.parametrize("h,w", [(33, 47), (32, 47), (33, 48)])
def test_write_mp4_odd_sizes_pad_by_edge(tmp_path: Path, h: int, w: int) -> None:
    frames = smooth_frames(4, h=h, w=w)
    assert write_mp4(frames, tmp_path / "odd.mp4") == 4
    info = probe_video(tmp_path / "odd.mp4")
    assert (info.height, info.width) == (h + h % 2, w + w % 2)
    decoded = read_frames(tmp_path / "odd.mp4")
    assert np.abs(decoded[:, :h, :w].astype(np.int16) - frames).mean() < 8
    padded = pad_to_even(frames)
    assert padded.shape[1:3] == (h + h % 2, w + w % 2)
    np.testing.assert_array_equal(padded[:, :h, :w], frames)
    np.testing.assert_array_equal(padded[:, -1, :w], frames[:, -1])  # replicated row / column


def test_streaming_writer_matches_batch(tmp_path: Path) -> None:
    frames = smooth_frames(45)
    with Mp4Writer(tmp_path / "stream.mp4") as writer:
        start = 0
        for n in CHUNKS:
            assert writer.write(frames[start : start + n]) == n
            start += n
    assert writer.frames_written == 45
    write_mp4(frames, tmp_path / "batch.mp4")
    streamed, batch = probe_video(tmp_path / "stream.mp4"), probe_video(tmp_path / "batch.mp4")
    assert streamed.num_frames == batch.num_frames == 45


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_mp4(np.zeros((2, 8, 8, 3), np.float32), tmp_path / "f.mp4")
    with pytest.raises(ValueError):
        write_mp4(np.zeros((2, 8, 8), np.uint8), tmp_path / "g.mp4")
    with pytest.raises(ValueError), Mp4Writer(tmp_path / "h.mp4") as writer:
        writer.write(np.zeros((1, 8, 8, 3), np.uint8))
        writer.write(np.zeros((1, 8, 10, 3), np.uint8))


# -- fragmented MP4 --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fmp4_pieces() -> tuple[list[bytes], bytes, np.ndarray]:
    frames = smooth_frames(sum(CHUNKS))
    muxer = FragmentedMp4Muxer(width=128, height=96, fps=24)
    pieces, start = [], 0
    for n in CHUNKS:
        pieces.append(muxer.add_chunk(frames[start : start + n]))
        start += n
    tail = muxer.close()
    assert muxer.close() == b""
    assert muxer.mime_type.startswith('video/mp4; codecs="avc1.')
    return pieces, tail, frames


def test_fmp4_box_layout(fmp4_pieces: tuple[list[bytes], bytes, np.ndarray]) -> None:
    pieces, tail, _ = fmp4_pieces
    assert tail == b""  # nothing held back across chunks
    first = [k for k, _, _ in iter_boxes(pieces[0])]
    assert first[:2] == ["ftyp", "moov"]
    assert first[2:] == ["moof", "mdat"]
    for piece in pieces[1:]:
        kinds = [k for k, _, _ in iter_boxes(piece)]
        assert kinds == ["moof", "mdat"]
    # each piece carries exactly its chunk's frames (latency: no frames held back)
    assert [trun_sample_count(p) for p in pieces] == list(CHUNKS)
    init, media = split_init_segment(pieces[0])
    assert [k for k, _, _ in iter_boxes(init)] == ["ftyp", "moov"]
    assert init + media == pieces[0]
    moov = dict((k, (o, s)) for k, o, s in iter_boxes(init))["moov"]
    assert {"mvhd", "trak", "mvex"} <= set(child_boxes(init, *moov))


def test_fmp4_decodes_with_one_keyframe_per_chunk(fmp4_pieces: tuple[list[bytes], bytes, np.ndarray]) -> None:
    pieces, tail, frames = fmp4_pieces
    decoded, keys, time_base = decode(b"".join(pieces) + tail)
    assert len(decoded) == 45
    assert keys == len(CHUNKS)
    assert sum(f.key_frame for f in decoded) == len(CHUNKS)
    key_idx = [i for i, f in enumerate(decoded) if f.key_frame]
    assert key_idx == list(np.cumsum((0,) + CHUNKS[:-1]))
    pts = [f.pts for f in decoded]
    assert all(b > a for a, b in itertools.pairwise(pts))
    times = [float(p * time_base) for p in pts]
    assert times == pytest.approx([i / 24 for i in range(45)], abs=1e-6)
    rgb = np.stack([f.to_ndarray(format="rgb24") for f in decoded])
    assert np.abs(rgb.astype(np.int16) - frames).mean() < 8
    info = probe_video(b"".join(pieces))
    assert (info.num_frames, info.codec, info.width, info.height) == (45, "h264", 128, 96)
    assert info.fps == pytest.approx(24.0)


Pieces = tuple[list[bytes], bytes, np.ndarray]


def test_fmp4_prefix_and_single_fragments_playable(fmp4_pieces: Pieces) -> None:
    pieces, _, _ = fmp4_pieces
    init, first_media = split_init_segment(pieces[0])
    media = [first_media, *pieces[1:]]
    for k in range(len(CHUNKS)):
        decoded, keys, _ = decode(init + b"".join(media[: k + 1]))  # client stopped after chunk k
        assert len(decoded) == sum(CHUNKS[: k + 1])
        assert keys == k + 1
        # a client joining at chunk k only needs the init segment plus that fragment
        alone, keys_alone, time_base = decode(init + media[k])
        assert len(alone) == CHUNKS[k] and keys_alone == 1
        assert float(alone[0].pts * time_base) == pytest.approx(sum(CHUNKS[:k]) / 24, abs=1e-6)


def test_fmp4_odd_size_and_ntsc_rate() -> None:
    muxer = FragmentedMp4Muxer(width=47, height=33, fps=30000 / 1001)
    data = muxer.add_chunk(smooth_frames(3, h=33, w=47)) + muxer.add_chunk(smooth_frames(4, 3, h=33, w=47))
    data += muxer.close()
    decoded, keys, time_base = decode(data)
    assert len(decoded) == 7 and keys == 2
    assert (decoded[0].width, decoded[0].height) == (48, 34)
    times = [float(f.pts * time_base) for f in decoded]
    assert times == pytest.approx([i * 1001 / 30000 for i in range(7)], abs=1e-6)
    with pytest.raises(ValueError):
        muxer.add_chunk(smooth_frames(1, h=33, w=47))  # closed


def test_iter_boxes_rejects_truncated() -> None:
    data = struct.pack(">I4s", 16, b"free") + b"\0" * 4  # claims 16 bytes, has 12
    with pytest.raises(ValueError):
        list(iter_boxes(data))
    assert list(iter_boxes(struct.pack(">I4s", 0, b"mdat") + b"xy")) == [("mdat", 0, 10)]
