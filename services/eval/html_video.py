"""A sample's video for the eval HTML reports, with its garment switches on a timeline.

Under the video, a bar as wide as the video stands for its duration; each switch is a red marker
at the switch's time (the first frame wearing the new garment, frame / fps) and a button under
it. Clicking either pauses the video on that frame. A dark line follows the playback position.
Everything is inline (the page stays one self-contained file)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CSS = """
.clip{display:inline-block;width:min-content;margin:6px 0 10px;vertical-align:top}
.clip video{display:block;height:320px;background:#000}
.timeline{position:relative;height:14px;background:#e6e6e6;border-radius:3px;margin-top:4px;cursor:pointer}
.timeline .marker{position:absolute;top:-3px;bottom:-3px;width:4px;margin-left:-2px;background:#c44e52;
border:0;padding:0;cursor:pointer;border-radius:2px}
.timeline .head{position:absolute;top:0;bottom:0;width:2px;margin-left:-1px;background:#333;left:0}
.switches{font-size:12px;margin-top:4px}
.switches button{font-size:12px;margin:2px 6px 0 0;border:1px solid #c44e52;background:#fff;color:#c44e52;
border-radius:3px;cursor:pointer;padding:1px 6px}
"""

# One per page: seek on a marker / button / timeline click, move the playhead while playing.
SCRIPT = """<script>
function fcSeek(id, t) {
  var v = document.getElementById(id); v.pause(); v.currentTime = t + 0.5 / Number(v.dataset.fps);
}
document.addEventListener('DOMContentLoaded', function () {
  document.querySelectorAll('video[data-fps]').forEach(function (v) {
    var bar = document.getElementById(v.id + '-timeline'), head = document.getElementById(v.id + '-head');
    v.addEventListener('timeupdate', function () {
      head.style.left = (100 * v.currentTime / Number(bar.dataset.duration)) + '%';
    });
    bar.addEventListener('click', function (e) {
      if (e.target !== bar) return;
      var r = bar.getBoundingClientRect();
      v.currentTime = Number(bar.dataset.duration) * (e.clientX - r.left) / r.width;
    });
  });
});
</script>"""


@dataclass(frozen=True)
class Switch:
    frame: int  # first frame wearing the new garment
    garment: str  # what the report calls it (a file name, "garment 2", ...)


def switch_time(frame: int, fps: float) -> float:
    """Seconds from the start of the video to `frame`."""
    return frame / fps


def video_with_switches(video_id: str, mp4: bytes | Path, frames: int, fps: float, switches: Sequence[Switch]) -> str:
    """The `<video>` (the MP4 inlined) and its switch timeline; needs `CSS` and `SCRIPT` on the page."""
    data = mp4.read_bytes() if isinstance(mp4, Path) else mp4
    duration = frames / fps
    e = html.escape
    vid = e(video_id)
    markers, buttons = [], []
    for n, sw in enumerate(switches, start=1):
        t = switch_time(sw.frame, fps)
        label = f"switch {n} at {t:.2f} s (frame {sw.frame}): {sw.garment}"
        markers.append(
            f"<button class=marker data-time='{t:.3f}' data-frame='{sw.frame}' style='left:{100 * t / duration:.2f}%'"
            f" title='{e(label)}' aria-label='{e(label)}' onclick=\"fcSeek('{vid}', {t:.3f})\"></button>"
        )
        buttons.append(f"<button onclick=\"fcSeek('{vid}', {t:.3f})\">{e(label)}</button>")
    legend = "".join(buttons) if buttons else "<span class=muted>no garment switch</span>"
    return (
        f"<figure class=clip><video id='{vid}' data-fps='{fps:g}' controls loop muted preload=metadata "
        f"src='data:video/mp4;base64,{base64.b64encode(data).decode('ascii')}'></video>"
        f"<div class=timeline id='{vid}-timeline' data-duration='{duration:.3f}' "
        f"title='{frames} frames, {duration:.2f} s'>"
        f"<div class=head id='{vid}-head'></div>{''.join(markers)}</div>"
        f"<div class=switches>{legend}</div></figure>"
    )
