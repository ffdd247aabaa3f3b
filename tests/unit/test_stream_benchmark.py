"""benchmarks/stream.py keeps its machine-readable contract: with --json the last line is one
JSON object carrying the hot-path ratios (issue 13) and, with the fast decoder, its speed-up and
PSNR against the VAE decoder. Numbers are not asserted (a benchmark measures; tests check)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "benchmarks/stream.py", *args, "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hot_path_ratios_are_in_the_json():
    r = _run("--preset", "tiny", "--chunks", "2", "--warmup", "0", "--no-compiled")
    for key in ("cache_overhead_ratio", "forward_vs_diffusers_ratio", "backbone_fps", "end_to_end_fps"):
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, key
    assert r["forwards_per_chunk"] == 5 and r["compiled_chunk_seconds"] is None


def test_fast_decoder_figures_on_the_shipped_checkpoint():
    r = _run("--checkpoint", "checkpoints/toy", "--decoder", "fast", "--chunks", "2", "--warmup", "0", "--no-hot-path")
    assert r["decoder"] == "fast"
    assert r["decode_speedup"] > 1.0  # the point of the fast decoder; its size is the benchmark's to report
    assert 20.0 < r["decode_psnr_db"] < 80.0  # a close copy of the VAE decoder, not the same frames
