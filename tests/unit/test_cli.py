"""The `fashionchameleon` CLI on the tiny preset (CPU, seconds): generate with garment
switches, determinism, checkpoint init/info, one-line errors for bad input, and the
`python -m services.cli` entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.cli import generate as generate_cmd
from services.cli.main import main
from shared.media.video import probe_video, read_frames
from shared.models.checkpoint import build_random
from shared.models.presets import get_preset
from shared.runtime.kv_cache import KVCacheSpec

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a person turns slowly and waves"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """ref.png (person), g1..g3.png (garments), bad.png (text, not an image)."""
    d = tmp_path_factory.mktemp("inputs")
    y, x = np.mgrid[0:120, 0:80]
    person = np.stack([x * 3, y * 2, 255 - x * 3], -1).astype(np.uint8)  # [120, 80, 3] gradient
    Image.fromarray(person).save(d / "ref.png")
    for i, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)], start=1):
        Image.new("RGB", (64, 72), colour).save(d / f"g{i}.png")
    (d / "bad.png").write_text("this is not a PNG")
    return d


def generate_args(d: Path, out: Path, *extra: str, chunks: int = 4) -> list[str]:
    return [
        "generate",
        "--preset",
        "tiny",
        "--reference",
        str(d / "ref.png"),
        "--garment",
        str(d / "g1.png"),
        "--prompt",
        PROMPT,
        "--chunks",
        str(chunks),
        "--seed",
        "7",
        "--out",
        str(out),
        *extra,
    ]


def run_cli(capsys, args: list[str]) -> tuple[int, str, str]:
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_generate_writes_switched_clip(inputs: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "nested" / "clip.mp4"
    switches = ["--switch", f"1:{inputs / 'g2.png'}", "--switch", f"3:{inputs / 'g3.png'}"]
    rc, stdout, stderr = run_cli(capsys, generate_args(inputs, out, *switches))
    assert rc == 0, stderr
    assert len(stdout.strip().splitlines()) == 1  # one JSON object
    summary = json.loads(stdout)

    info = probe_video(out)
    assert info.num_frames == 9 + 12 * 3 == summary["frames"]
    assert info.fps == pytest.approx(24.0) and summary["fps"] == 24
    assert info.codec == "h264"
    assert (info.width, info.height) == (summary["width"], summary["height"]) == (128, 96)
    assert not list(out.parent.glob(".*partial"))  # no leftovers next to the clip

    assert summary["chunks"] == 4 and summary["seed"] == 7 and summary["preset"] == "tiny"
    assert summary["out"] == str(out)
    assert [s["chunk"] for s in summary["switches"]] == [1, 3]
    assert summary["switches"][0]["garment"].endswith("g2.png")
    assert all(s["latency_seconds"] > 0 for s in summary["switches"])
    per_chunk = summary["per_chunk"]
    assert [c["index"] for c in per_chunk] == [0, 1, 2, 3]
    assert [c["frames"] for c in per_chunk] == [9, 12, 12, 12]
    assert [c["switched"] for c in per_chunk] == [False, True, False, True]
    gen = sum(c["generate_seconds"] for c in per_chunk)
    dec = sum(c["decode_seconds"] for c in per_chunk)
    assert summary["generate_seconds"] == pytest.approx(gen)
    assert summary["backbone_fps"] == pytest.approx(45 / gen)
    assert summary["end_to_end_fps"] == pytest.approx(45 / (gen + dec))
    assert 0 < summary["time_to_first_chunk_seconds"] <= summary["total_seconds"]


def test_generate_is_deterministic(inputs: Path, tmp_path: Path, capsys) -> None:
    clips = []
    for name in ("a.mp4", "b.mp4"):
        args = generate_args(inputs, tmp_path / name, "--switch", f"2:{inputs / 'g2.png'}", chunks=3)
        rc, _, stderr = run_cli(capsys, args)
        assert rc == 0, stderr
        clips.append(read_frames(tmp_path / name))
    assert clips[0].shape == (9 + 12 * 2, 96, 128, 3)
    np.testing.assert_array_equal(clips[0], clips[1])


def test_checkpoint_init_info_and_generate(inputs: Path, tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "ckpt"
    rc, stdout, stderr = run_cli(capsys, ["checkpoint", "init", "--preset", "tiny", "--out", str(ckpt), "--seed", "3"])
    assert rc == 0, stderr
    created = json.loads(stdout)
    assert created["path"] == str(ckpt) and created["preset"] == "tiny"
    params = created["parameters"]
    assert params["total"] == params["transformer"] + params["vae"] + params["text_encoder"] > 0
    assert (ckpt / "model_index.json").is_file() and (ckpt / "transformer" / "config.json").is_file()

    rc, stdout, stderr = run_cli(capsys, ["checkpoint", "info", str(ckpt)])
    assert rc == 0, stderr
    info = json.loads(stdout)
    assert info["preset"] == "tiny" and info["checkpoint_id"] == created["checkpoint_id"]
    assert info["parameters"] == params  # read from safetensors headers, no weights loaded
    assert info["tokens_per_frame"] == 12 and info["dit"]["num_layers"] == 2

    out = tmp_path / "ckpt.mp4"
    args = ["generate", "--checkpoint", str(ckpt), *generate_args(inputs, out, chunks=2)[3:]]
    rc, stdout, stderr = run_cli(capsys, args)
    assert rc == 0, stderr
    summary = json.loads(stdout)
    assert summary["checkpoint_id"] == created["checkpoint_id"] and summary["frames"] == 21
    assert probe_video(out).num_frames == 21

    # Refuses to overwrite a checkpoint.
    rc, _, stderr = run_cli(capsys, ["checkpoint", "init", "--preset", "tiny", "--out", str(ckpt)])
    assert rc == 2 and "not empty" in stderr


def test_presets_lists_sizes(capsys) -> None:
    rc, stdout, _ = run_cli(capsys, ["presets", "--json"])
    assert rc == 0
    rows = {r["name"]: r for r in map(json.loads, stdout.splitlines())}
    assert {"tiny", "small", "wan2.2-ti2v-5b"} <= set(rows)
    full = rows["wan2.2-ti2v-5b"]
    assert full["tokens_per_frame"] == 880
    # cond 2 + sink 3 + window 15 + chunk 3 = 23 = 2 + 21, the paper's trained sequence length
    assert (full["max_cache_frames"], full["attended_frames"], full["trained_frames"]) == (18, 23, 23)
    assert rows["toy"]["attended_frames"] == rows["toy"]["trained_frames"] == 14
    assert all(r["attended_frames"] <= r["trained_frames"] for r in rows.values())
    assert full["kv_cache_bytes"] == KVCacheSpec.from_preset(get_preset("wan2.2-ti2v-5b"), torch.bfloat16).bytes


# ---- bad input -------------------------------------------------------------------------------
BAD_GENERATE = {
    "missing-reference": (["--reference", "{d}/nope.png"], "no such file"),
    "garment-not-an-image": (["--garment", "{d}/bad.png"], "not a supported image"),
    "switch-image-missing": (["--switch", "2:{d}/missing.png"], "no such file"),
    "unknown-preset": (["--preset", "huge"], "unknown preset"),
    "switch-malformed": (["--switch", "x"], "malformed"),
    "switch-not-a-number": (["--switch", "a:{d}/g2.png"], "malformed"),
    "switch-no-image": (["--switch", "2:"], "malformed"),
    "switch-chunk-0": (["--switch", "0:{d}/g2.png"], "out of range"),
    "switch-chunk-N": (["--switch", "4:{d}/g2.png"], "out of range"),
    "switch-twice": (["--switch", "2:{d}/g2.png", "--switch", "2:{d}/g3.png"], "two --switch"),
    "chunks-0": (["--chunks", "0"], "chunks"),
    "chunks-not-int": (["--chunks", "many"], "invalid int"),
    "empty-prompt": (["--prompt", "   "], "prompt"),
    "both-sources": (["--checkpoint", "{d}"], "not allowed"),
    "bad-resolution": (["--height", "100", "--width", "128"], "multiples"),
    "height-without-width": (["--height", "96"], "--width"),
    "bad-device": (["--device", "warp-drive"], "device"),
    "output-not-writable": (["--out", "{d}/g1.png/clip.mp4"], "not writable"),
    "output-is-dir": (["--out", "{d}"], "directory"),
}


def _with(base: list[str], changes: list[str]) -> list[str]:
    """Replace options of `base` with those in `changes` (appended when not present)."""
    args = list(base)
    i = 0
    while i < len(changes):
        flag = changes[i]
        value = changes[i + 1] if i + 1 < len(changes) and not changes[i + 1].startswith("--") else None
        if flag in args and flag != "--switch":
            j = args.index(flag)
            args[j + 1] = value
        else:
            args += [flag] if value is None else [flag, value]
        i += 1 if value is None else 2
    return args


@pytest.fixture
def no_model(monkeypatch):
    """Bad input must fail before any model is built."""

    def fail(*args, **kwargs):
        raise AssertionError("a model was built before the input was validated")

    monkeypatch.setattr(generate_cmd, "build_engine", fail)


def assert_usage_error(rc: int, stdout: str, stderr: str, word: str) -> None:
    assert rc == 2
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert word.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("case", list(BAD_GENERATE))
def test_generate_bad_input(case: str, inputs: Path, tmp_path: Path, capsys, no_model) -> None:
    changes, word = BAD_GENERATE[case]
    changes = [c.format(d=inputs) for c in changes]
    args = _with(generate_args(inputs, tmp_path / "clip.mp4"), changes)
    assert_usage_error(*run_cli(capsys, args), word)
    assert not (tmp_path / "clip.mp4").exists()


@pytest.mark.parametrize(
    "args, word",
    [
        (["generate", "--checkpoint", "{t}/does-not-exist", "--reference", "{d}/ref.png", "--garment",
          "{d}/g1.png", "--prompt", "p", "--chunks", "1", "--out", "{t}/o.mp4"], "checkpoint"),
        (["generate", "--checkpoint", "{t}", "--reference", "{d}/ref.png", "--garment", "{d}/g1.png",
          "--prompt", "p", "--chunks", "1", "--out", "{t}/o.mp4"], "not a checkpoint"),  # empty folder
        (["checkpoint", "info", "{t}/does-not-exist"], "does not exist"),
        (["checkpoint", "init", "--preset", "huge", "--out", "{t}/ck"], "unknown preset"),
        (["checkpoint", "init", "--preset", "tiny", "--out", "{d}/g1.png"], "not a folder"),
        (["checkpoint"], "required"),
        ([], "required"),
        (["teleport"], "invalid choice"),
    ],
    ids=["checkpoint-missing", "checkpoint-empty-dir", "info-missing", "init-unknown-preset",
         "init-out-is-file", "checkpoint-no-action", "no-command", "unknown-command"],
)  # fmt: skip
def test_other_bad_input(args: list[str], word: str, inputs: Path, tmp_path: Path, capsys, no_model) -> None:
    args = [a.format(d=inputs, t=tmp_path) for a in args]
    assert_usage_error(*run_cli(capsys, args), word)


def test_generate_without_a_source_uses_the_default_checkpoint_and_names_it_when_missing(
    inputs: Path, tmp_path: Path, capsys, no_model, monkeypatch
) -> None:
    """Neither --checkpoint nor --preset: the shipped toy model (or $FASHIONCHAMELEON_DEFAULT_CHECKPOINT)."""
    from shared.models.checkpoint import DEFAULT_CHECKPOINT_ENV

    monkeypatch.setenv(DEFAULT_CHECKPOINT_ENV, str(tmp_path / "nowhere"))
    args = [
        "generate",
        "--reference",
        f"{inputs}/ref.png",
        "--garment",
        f"{inputs}/g1.png",
        "--prompt",
        "p",
        "--chunks",
        "1",
        "--out",
        str(tmp_path / "o.mp4"),
    ]
    assert_usage_error(*run_cli(capsys, args), "default checkpoint")


def test_module_entry_point(inputs: Path, tmp_path: Path) -> None:
    """`python -m services.cli` is the installed `fashionchameleon` script's code path."""
    out = tmp_path / "entry.mp4"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", *generate_args(inputs, out, chunks=1)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["frames"] == 9
    assert probe_video(out).num_frames == 9


def test_random_weights_for_folder_tokenizer_presets() -> None:
    """The full preset reads its umT5 tokenizer from a folder; random weights use the byte one
    (checked on a tiny copy so no 5B model is built)."""
    tiny = get_preset("tiny")
    folder_tiny = tiny.model_copy(update={"text_encoder": tiny.text_encoder.model_copy(update={"tokenizer": "folder"})})
    components = build_random(folder_tiny, seed=0, dtype=torch.float32)
    assert components.text_encoder.config.tokenizer == "byte"
    assert components.preset.dit == tiny.dit and components.preset.streaming == tiny.streaming
