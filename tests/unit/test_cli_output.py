"""The CLI's surface for people and for programs: `--help` of every command loads no model or
cluster code (fast on any machine), and the commands that print a result print a readable
summary on a terminal and JSON with `--json` or when stdout is not a terminal."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli.main import GROUPS, build_parser, main
from shared import cli as shared_cli

REPO = Path(__file__).resolve().parents[2]
# Never needed to print help or a usage error.
HEAVY = ("torch", "diffusers", "transformers", "ray", "av", "cv2")


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path below `parser` (`("checkpoint", "info")`, ...), the parser's own first."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += _subcommands(sub, (*prefix, name))
    return paths


def _command_paths() -> list[tuple[str, ...]]:
    paths = [()]
    for group in GROUPS:
        sub = next(a for a in build_parser(group)._actions if isinstance(a, argparse._SubParsersAction))
        paths += _subcommands(sub.choices[group], (group,))
    return paths


COMMANDS = _command_paths()


def _loaded_by(argv: list[str]) -> tuple[int, list[str], str]:
    """Run `fashionchameleon ARGV` in a fresh interpreter; (exit status, HEAVY modules it imported, stderr)."""
    probe = (
        "import json, sys\n"
        "from services.cli.main import main\n"
        f"status = main({argv!r})\n"
        f"print(json.dumps([status, sorted(m for m in {HEAVY!r} if m in sys.modules)]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    status, loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    return status, loaded, proc.stderr


def test_every_group_and_action_is_probed():
    assert {"generate", "presets", "up", "demo"} <= {p[0] for p in COMMANDS if p}
    for path in [("checkpoint", "info"), ("batch", "status"), ("train", "teacher"), ("eval", "run"), ("curate", "run")]:
        assert path in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "top")
def test_help_imports_no_model_or_cluster_code(path):
    status, loaded, _ = _loaded_by([*path, "--help"])
    assert status == 0
    assert loaded == [], f"`fashionchameleon {' '.join(path)} --help` imported {loaded}"


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--chunks", "many"],
        ["checkpoint", "info"],
        ["presets", "--dtype", "int3"],
        ["eval", "run", "--bench"],
        ["train", "teacher", "--max-steps", "x"],
        ["batch", "status", "--state", "sleeping"],
        ["curate", "run"],
        ["up", "--grpc-port", "x"],
    ],
    ids=lambda a: " ".join(a),
)
def test_argument_errors_import_no_model_or_cluster_code(argv):
    status, loaded, stderr = _loaded_by(argv)
    assert status == 2 and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
    assert loaded == []


def test_attention_backend_names_match_the_registry():
    from shared.models.attention import BACKENDS

    assert set(shared_cli.ATTENTION_BACKENDS) == set(BACKENDS)


# ---- a summary on a terminal, JSON for programs ----------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(monkeypatch, argv: list[str], terminal: bool) -> tuple[int, str]:
    out = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    return main(argv), out.getvalue()


def test_checkpoint_info_reads_on_a_terminal_and_parses_off_it(monkeypatch):
    toy = str(REPO / "checkpoints" / "toy")
    status, human = _run(monkeypatch, ["checkpoint", "info", toy], terminal=True)
    assert status == 0
    assert not human.lstrip().startswith("{")
    assert "toy-dmd-step150 (preset toy)" in human and "96x160 at 24 fps" in human
    assert "sink 3 + window 6" in human and "MiB per session" in human
    for argv, terminal in (([toy], False), ([toy, "--json"], True)):
        status, text = _run(monkeypatch, ["checkpoint", "info", *argv], terminal=terminal)
        data = json.loads(text)  # one object: what scripts and tests have read all along
        assert status == 0 and data["checkpoint_id"] == "toy-dmd-step150" and data["streaming"]["sink_frames"] == 3


def test_presets_prints_a_table_and_json_on_request(monkeypatch):
    _, table = _run(monkeypatch, ["presets"], terminal=True)
    assert table.splitlines()[0].split()[:3] == ["preset", "resolution", "fps"]
    _, lines = _run(monkeypatch, ["presets", "--json"], terminal=True)
    assert {json.loads(line)["name"] for line in lines.splitlines()} >= {"toy", "tiny"}


def test_emit_chooses_json_for_pipes_and_the_flag(monkeypatch):
    result = {"state": "SUCCEEDED", "n": 1}
    for terminal, flag, want_json in ((True, False, False), (True, True, True), (False, False, True)):
        out = _Terminal() if terminal else io.StringIO()
        monkeypatch.setattr(sys, "stdout", out)
        shared_cli.emit(argparse.Namespace(json=flag), result, lambda r: f"state {r['state']}")
        assert (json.loads(out.getvalue()) == result) if want_json else out.getvalue() == "state SUCCEEDED\n"


def test_generate_summary_for_people():
    from services.cli.generate import describe

    text = describe(
        {
            "out": "clip.mp4", "frames": 69, "chunks": 6, "width": 96, "height": 160, "fps": 24, "seed": 0,
            "checkpoint_id": "toy-dmd-step150", "preset": "toy", "device": "cpu", "dtype": "float32",
            "load_seconds": 0.2, "time_to_first_chunk_seconds": 0.81, "total_seconds": 3.2, "generate_seconds": 2.0,
            "decode_seconds": 1.0, "backbone_fps": 34.5, "end_to_end_fps": 23.0,
            "switches": [{"chunk": 3, "garment": "examples/garment-green.png", "latency_seconds": 0.05}],
            "per_chunk": [],
        }
    )  # fmt: skip
    assert text.splitlines()[0] == "wrote clip.mp4: 69 frames in 6 chunks, 96x160 at 24 fps (2.9 s of video), seed 0"
    assert "backbone 34.5 FPS, end to end 23.0 FPS" in text
    assert "before chunk 3 to examples/garment-green.png (0.05 s)" in text


def test_batch_tables_show_state_names_and_chunk_counts():
    from fashionchameleon.v1 import studio_pb2
    from services.jobs import cli as batch

    job = studio_pb2.Job(job_id="job_1", idempotency_key="clip-a", state=studio_pb2.Job.FAILED, attempts=2)
    job.chunks_done, job.chunks_total, job.error_message = 3, 8, "generator lost"
    summary = batch.job_summary(job)
    assert summary["state"] == "FAILED"  # a name in the JSON too, never the enum's number
    table = batch.describe_jobs([summary]).splitlines()
    assert table[0].split() == ["job", "id", "id", "state", "attempts", "chunks", "result"]
    assert table[1].split() == ["job_1", "clip-a", "FAILED", "2", "3/8", "generator", "lost"]
    text = batch.describe_submit(
        {"manifest": "clips.jsonl", "clips": 1, "created": 1, "existing": 0, "jobs": [{"line": 1, **summary}],
         "states": {"FAILED": 1}}
    )  # fmt: skip
    assert text.startswith("submitted clips.jsonl: 1 clips (1 new, 0 already submitted)\nfinished: 1 failed")


def test_train_and_eval_summaries_for_people():
    from services.eval.cli import describe_run
    from training.cli import describe_recipe, describe_stage

    stage = describe_stage(
        {"stage": "teacher_forcing", "recipe": "tiny", "run_dir": "runs/tf", "resumed_from": 0, "step": 20,
         "world_size": 1, "last": {"step": 19, "loss": 0.123456}, "seconds": 12.5}
    )  # fmt: skip
    assert stage.startswith("teacher forcing stage of recipe tiny: steps 0..20 on 1 rank(s) in 12.5 s")
    assert "loss 0.1235" in stage
    run = describe_run(
        {"run_id": "smoke-1", "benchmark": "smoke", "samples": 2, "failed": 0, "metrics": {"backbone_fps": 41.25},
         "unavailable": {"judge_hgc": {"no judge configured": 2}}, "reports": {"html": "runs/smoke-1/report.html"}}
    )  # fmt: skip
    assert run.splitlines()[0] == "eval run smoke-1 on bench smoke: 2 samples, 0 failed"
    assert "backbone_fps  41.25" in run and "judge_hgc: unavailable (no judge configured (2))" in run
    plan = {"stage": "teacher", "world_size": 8, "parameters": 5_000_000_000, "tokens": 20240,
            "model_states_gib": 9.5, "activations_gib": 20.0, "kv_cache_gib": 0.0, "total_gib": 40.1}  # fmt: skip
    recipe = describe_recipe({"recipe": {"name": "wan2.2-ti2v-5b"}, "memory_plan": {"teacher": plan}})
    assert "on 8 GPU(s)" in recipe and "40.1" in recipe.splitlines()[-1]
