"""The streamed fMP4 plays in a real browser through Media Source Extensions.

Headless Chromium (Debian's `chromium`; skipped where it is not installed) loads a page served
on loopback that appends the pieces of a stream to a SourceBuffer, as a storefront player
does, and reports what it buffered. Covers a full stream and a resumed one (init segment +
the pieces from chunk 2 on, as StreamSession sends after a reconnect).
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import threading

import numpy as np
import pytest

from shared.media.fmp4 import FragmentedMp4Muxer, split_init_segment

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs chromium (.ci/run), so there a missing browser fails instead of skipping.
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="needs Debian's chromium (apt-get install chromium)"
)

PAGE = """<html><body><video id=v muted></video><pre id=out>pending</pre><script>
const pieces = %(pieces)s.map(b => Uint8Array.from(atob(b), c => c.charCodeAt(0)));
const out = document.getElementById('out'), v = document.getElementById('v'), mime = %(mime)s;
if (!MediaSource.isTypeSupported(mime)) { out.textContent = 'UNSUPPORTED'; }
else {
  const ms = new MediaSource(); v.src = URL.createObjectURL(ms);
  ms.addEventListener('sourceopen', () => {
    const sb = ms.addSourceBuffer(mime); let i = 0;
    sb.addEventListener('error', () => { out.textContent = 'ERROR ' + i; });
    sb.addEventListener('updateend', () => {
      if (i < pieces.length) { sb.appendBuffer(pieces[i++]); return; }
      const b = sb.buffered, r = [];
      for (let k = 0; k < b.length; k++) r.push([b.start(k), b.end(k)]);
      // readyState follows the append asynchronously: report once the element can play.
      const report = () => { out.textContent = 'RESULT ' + JSON.stringify({buffered: r, readyState: v.readyState}); };
      ms.endOfStream();
      if (v.readyState >= 3) report(); else { v.addEventListener('canplay', report); setTimeout(report, 5000); }
    });
    sb.appendBuffer(pieces[i++]);
  });
}
</script></body></html>"""


def stream_pieces(chunk_frames=(9, 12, 12, 12), fps=24) -> tuple[str, list[bytes]]:
    muxer = FragmentedMp4Muxer(128, 96, fps=fps)
    pieces, t = [], 0
    for n in chunk_frames:
        frames = np.zeros((n, 96, 128, 3), np.uint8)
        for i in range(n):
            frames[i, :, :, 0] = (t * 5) % 255
            frames[i, 20:60, (2 * t) % 100 : (2 * t) % 100 + 20, 1] = 200
            t += 1
        pieces.append(muxer.add_chunk(frames))
    return muxer.mime_type, pieces


def play(tmp_path, mime: str, pieces: list[bytes]) -> dict:
    (tmp_path / "index.html").write_text(
        PAGE % {"pieces": json.dumps([base64.b64encode(p).decode() for p in pieces]), "mime": json.dumps(mime)}
    )
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dom = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--virtual-time-budget=10000",
                "--dump-dom",
                f"http://127.0.0.1:{server.server_address[1]}/index.html",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    finally:
        server.shutdown()
    match = re.search(r"<pre id=\"out\">([^<]*)", dom)
    assert match and match.group(1).startswith("RESULT "), f"player said: {match.group(1) if match else dom[-500:]}"
    return json.loads(match.group(1)[len("RESULT ") :])


def test_a_whole_stream_plays_through_media_source_extensions(tmp_path):
    mime, pieces = stream_pieces()
    result = play(tmp_path, mime, pieces)
    ((start, end),) = result["buffered"]
    assert start == pytest.approx(0.0, abs=1e-3) and end == pytest.approx(45 / 24, abs=1e-3)
    assert result["readyState"] >= 3  # HAVE_FUTURE_DATA: it can play


def test_a_resumed_stream_lands_at_its_own_timestamps(tmp_path):
    mime, pieces = stream_pieces()
    init, _ = split_init_segment(pieces[0])
    result = play(tmp_path, mime, [init + pieces[2], pieces[3]])  # reconnect at chunk 2
    ((start, end),) = result["buffered"]
    assert start == pytest.approx(21 / 24, abs=1e-3) and end == pytest.approx(45 / 24, abs=1e-3)


@pytest.mark.parametrize("with_init", [False, True], ids=["init-cut", "init-repeated"])
def test_a_restarted_decode_stream_mid_stream_plays_on_without_a_gap(tmp_path, with_init):
    """A chunk the generator redoes for a switch (or a failover) comes from a new decode stream: a new
    muxer at the timeline's frame, whose first piece starts with its init segment. The generator cuts
    that init segment off when it is the stream's own (the same codec configuration); either way,
    appended after the pieces already sent, the buffered range goes on without a gap."""
    mime, pieces = stream_pieces()
    restarted = FragmentedMp4Muxer(128, 96, fps=24, start_frame=21, start_sequence=2)
    frames = np.full((12, 96, 128, 3), 90, np.uint8)
    redone = [restarted.add_chunk(frames), restarted.add_chunk(frames)]  # chunks 2 and 3
    init, media = split_init_segment(redone[0])
    assert init == split_init_segment(pieces[0])[0]  # the same init
    if not with_init:
        redone[0] = media
    result = play(tmp_path, mime, pieces[:2] + redone)
    ((start, end),) = result["buffered"]
    assert start == pytest.approx(0.0, abs=1e-3) and end == pytest.approx(45 / 24, abs=1e-3)
    assert result["readyState"] >= 3
