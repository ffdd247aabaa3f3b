"""examples/switch_garment.py and examples/switch_garment_async.py against a real suite (one
start for both): the switch is acknowledged, a later chunk applies it, the saved MP4 decodes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.media.video import probe_video
from tests.fixtures.ray_suite import ray_suite

pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parents[2]
KEY = "key-examples-0123456789"
CHUNKS = 8  # room for the switch: the generator may run a few chunks ahead of the reader

suite = ray_suite("examples", keys={"dev": KEY}, sessions_per_replica=2)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["switch_garment.py", "switch_garment_async.py"])
def test_switch_example(suite, script: str, tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / script),
            "--target",
            suite.target,
            "--api-key",
            KEY,
            "--out",
            str(out),
            "--chunks",
            str(CHUNKS),
            "--switch-after",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["chunks"] == CHUNKS
    assert result["switch"]["garment_id"] and result["switch"]["effective_chunk_index"] >= 2
    assert result["switch_applied_at_chunk"] == result["switch"]["effective_chunk_index"]
    info = probe_video(out)
    assert info.num_frames > 0
