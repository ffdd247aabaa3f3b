"""`fashionchameleon train` end to end on the tiny preset: preprocess synthetic data, train the
teacher, export it, and generate a clip from the export with `fashionchameleon generate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import services.cli.main as cli_main
from shared.media.video import probe_video
from shared.models.checkpoint import load_checkpoint
from training.metrics import TENSORBOARD_AVAILABLE


@pytest.fixture(autouse=True)
def _cli_with_train(monkeypatch):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run(capsys, *args: str) -> tuple[int, dict | None, str]:
    rc = cli_main.main(list(args))
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.startswith("{")]
    return rc, (json.loads(lines[-1]) if lines else None), out.err


def test_preprocess_train_export_generate(tmp_path: Path, capsys) -> None:
    data, runs, ckpt = tmp_path / "data", tmp_path / "runs", tmp_path / "ckpt"
    rc, summary, err = run(
        capsys,
        "train",
        "preprocess",
        "--synthetic",
        "2",
        "--max-pixel-frames",
        "21",
        "--dtype",
        "float32",
        "--out",
        str(data),
    )
    assert rc == 0, err
    assert summary["samples"] == 2 and (data / "index.json").is_file()

    rc, summary, err = run(
        capsys,
        "train",
        "teacher",
        "--recipe",
        "tiny",
        "--data",
        str(data),
        "--run-dir",
        str(runs / "teacher"),
        "--set",
        "run.max_steps=4",
        "--set",
        "run.log_every=2",
        "--set",
        "run.tensorboard=true",
    )
    assert rc == 0, err
    if TENSORBOARD_AVAILABLE:
        assert list((runs / "teacher" / "tensorboard").glob("events.out.tfevents.*"))
    assert summary["step"] == 4 and summary["resumed_from"] == 0 and summary["last"]["loss"] > 0
    rows = [json.loads(line) for line in (runs / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 3]

    rc, summary, err = run(
        capsys,
        "train",
        "teacher",
        "--recipe",
        "tiny",
        "--data",
        str(data),
        "--run-dir",
        str(runs / "teacher"),
        "--set",
        "run.max_steps=5",
    )
    assert rc == 0 and summary["resumed_from"] == 4 and summary["step"] == 5, err

    rc, summary, err = run(capsys, "train", "export", "--from", str(runs / "teacher"), "--out", str(ckpt))
    assert rc == 0, err
    assert summary["stage"] == "teacher" and summary["step"] == 5
    assert summary["checkpoint_id"] == "tiny-teacher-step5"
    loaded = load_checkpoint(ckpt, parts=frozenset({"dit"}))
    assert loaded.preset.name == "tiny" and loaded.checkpoint_id == "tiny-teacher-step5"

    ref, garment, clip = tmp_path / "ref.png", tmp_path / "garment.png", tmp_path / "clip.mp4"
    Image.fromarray(np.full((96, 128, 3), 120, np.uint8)).save(ref)
    Image.new("RGB", (40, 60), (200, 30, 30)).save(garment)
    rc, summary, err = run(
        capsys,
        "generate",
        "--checkpoint",
        str(ckpt),
        "--reference",
        str(ref),
        "--garment",
        str(garment),
        "--prompt",
        "a person turns slowly",
        "--chunks",
        "2",
        "--out",
        str(clip),
    )
    assert rc == 0, err
    assert summary["checkpoint_id"] == "tiny-teacher-step5" and probe_video(clip).num_frames == 21


def test_train_errors_are_one_line(tmp_path: Path, capsys) -> None:
    rc, _, err = run(capsys, "train", "teacher", "--recipe", "no-such-recipe", "--data", str(tmp_path))
    assert rc == 2 and err.startswith("error: recipe:") and err.count("\n") == 1
    rc, _, err = run(capsys, "train", "teacher", "--recipe", "tiny", "--set", "run.nope=1", "--data", str(tmp_path))
    assert rc == 2 and "nope" in err
    rc, _, err = run(capsys, "train", "export", "--from", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert rc == 2 and "neither a training run" in err
    rc, summary, err = run(capsys, "train", "recipe", "--recipe", "wan2.2-ti2v-5b", "--gpus", "8")
    assert rc == 0, err
    plan = summary["memory_plan"]
    assert plan["teacher"]["parameters"] > 4.9e9 and plan["dmd"]["total_gib"] > plan["teacher"]["total_gib"]
