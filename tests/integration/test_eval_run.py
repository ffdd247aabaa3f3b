"""The eval service end to end on the tiny preset (CPU, seconds): the smoke bench generated,
scored (a local chat-completions judge on 127.0.0.1 included) and reported as JSON, Markdown and
HTML in the run folder and the object store; resume; `eval compare` catching a planted
regression; the Eval gRPC service over loopback."""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
import time
from concurrent import futures
from contextlib import redirect_stdout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from fashionchameleon.v1 import eval_pb2, eval_pb2_grpc
from services.eval import cli as eval_cli
from services.eval.backends import EngineBackend
from services.eval.bench import load_benchmark
from services.eval.config import EvalConfig, JudgeConfig, RunnerConfig
from services.eval.report import write_reports
from services.eval.runner import RunMismatch, Runner
from services.eval.scoring import Scorer
from services.eval.service import EvalService
from services.eval.smoke import SMOKE_NAME, write_smoke_bench
from shared.cli import CliError, Parser
from shared.runtime.pipeline import Engine
from shared.storage import LocalObjectStore, LocalStoreConfig

pytest.importorskip("cv2")
pytest.importorskip("matplotlib")


class Judge:
    """A chat-completions server that grades every request 4/3/5 (varying a little per call)."""

    def __init__(self):
        self.calls = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.calls += 1
                hgc = 4 + outer.calls % 2  # 4 or 5
                content = (
                    "```json\n"
                    + json.dumps(
                        {
                            "high-level garment consistency": hgc,
                            "low-level garment consistency": 3,
                            "non-target garment preservation": 5,
                        }
                    )
                    + "\n```"
                )
                data = json.dumps({"choices": [{"message": {"content": content}, "finish_reason": "stop"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()


@pytest.fixture(scope="module")
def judge():
    j = Judge()
    yield j
    j.httpd.shutdown()
    j.httpd.server_close()


@pytest.fixture(scope="module")
def engine():
    return Engine.from_preset("tiny")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return load_benchmark(write_smoke_bench(tmp_path_factory.mktemp("smoke")), name=SMOKE_NAME)


def config(judge: Judge, **runner) -> EvalConfig:
    return EvalConfig(
        runner=RunnerConfig(**runner),
        judge=JudgeConfig(provider="openai", base_url=judge.url, model="fake-vl", repeats=2, backoff_s=0.0, frames=4),
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, engine, bench, judge):
    root = tmp_path_factory.mktemp("eval")
    store = LocalObjectStore(LocalStoreConfig(root=root / "store", fsync=False))
    store.ensure_bucket()
    cfg = config(judge)
    run_dir = root / "baseline"
    runner = Runner(
        bench, EngineBackend(engine), Scorer(cfg.metrics, cfg.judge), cfg, run_dir, label="smoke", show_progress=False
    )
    start = time.perf_counter()
    progress = runner.run()
    report = write_reports(run_dir, bench, store)
    return {
        "run_dir": run_dir,
        "store": store,
        "report": report,
        "progress": progress,
        "cfg": cfg,
        "seconds": time.perf_counter() - start,
        "judge_calls": judge.calls,
    }


def test_full_smoke_run_writes_json_markdown_and_html_reports(full_run, bench):
    run_dir, report, store = full_run["run_dir"], full_run["report"], full_run["store"]
    assert full_run["progress"].done == 4 and full_run["progress"].failed == 0
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["run_id"] == "baseline" and on_disk["benchmark"]["name"] == "smoke"
    assert on_disk["benchmark"]["samples"] == 4 and on_disk["benchmark"]["generated"] == 4
    m = on_disk["metrics"]
    # metrics that run offline have values on every sample
    for key in (
        "motion_amplitude",
        "motion_amplitude_opens2v",
        "temporal_smoothness_warp",
        "visual_quality_weightfree",
        "backbone_fps",
        "end_to_end_fps",
        "time_to_first_chunk_seconds",
    ):
        assert m[key]["status"] == "ok" and m[key]["n"] == 4 and m[key]["value"] > 0, key
    # the judge: 2 repeats x 5 judged segments (3 plain samples + 2 segments of the interactive one)
    assert full_run["judge_calls"] == 10
    assert (
        m["judge_hgc"]["value"] == pytest.approx(4.5) and m["judge_lgc"]["value"] == 3 and m["judge_ntp"]["value"] == 5
    )
    # interactive: one switch, per-segment judge scores, continuity and switch latency
    assert m["switch_continuity"]["n"] == 1 and 0 < m["switch_continuity"]["value"] <= 1
    assert m["switch_latency_seconds"]["n"] == 1 and m["switch_latency_seconds"]["aggregate"] == "p50"
    inter = next(s for s in on_disk["samples"] if s["id"] == "smoke-interactive")
    assert [(g["start_frame"], g["end_frame"]) for g in inter["segments"]] == [(0, 21), (21, 33)]
    assert all(g["scores"]["judge_hgc"] == 4.5 for g in inter["segments"])
    assert inter["switch_boundaries"][0]["frame"] == 21
    # weights not given: unavailable with the reason, never a number
    for key in ("temporal_smoothness_qalign", "visual_quality_musiq", "text_alignment_gme"):
        assert m[key]["status"] == "unavailable" and m[key]["value"] is None and m[key]["reasons"]
    assert m["face_similarity"]["status"] in ("ok", "partial", "missing", "unavailable")
    assert m["face_similarity"]["n"] + m["face_similarity"]["n_missing"] + m["face_similarity"]["n_unavailable"] == 4
    # videos have the requested lengths
    assert {s["id"]: s["frames"] for s in on_disk["samples"]} == {s.id: s.frames for s in bench.samples}
    # Markdown and HTML
    md = (run_dir / "report.md").read_text()
    assert "| metric | value |" in md and "`judge_hgc`" in md and "## Interactive runs" in md and "unavailable" in md
    page = (run_dir / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "http://" not in page.replace(full_run["cfg"].judge.base_url, "")
    assert len(re.findall(r"data:image/png;base64,", page)) >= 8  # histograms
    assert len(re.findall(r"data:image/jpeg;base64,", page)) == 4  # one frame strip per sample
    # the object store has all three
    for key in report["objects"].values():
        assert store.stat(key).size > 0
    assert json.loads(store.get_bytes(report["objects"]["json"]))["run_id"] == "baseline"


def test_rerun_resumes_without_regenerating_or_rejudging(full_run, bench, engine, judge):
    run_dir, cfg = full_run["run_dir"], full_run["cfg"]
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.glob("samples/*/*.json")}
    calls = judge.calls
    rescored = run_dir / "samples" / "smoke-long" / "metrics.json"
    rescored.unlink()  # as if interrupted while scoring it
    del mtimes[rescored]
    runner = Runner(bench, EngineBackend(engine), Scorer(cfg.metrics, cfg.judge), cfg, run_dir, show_progress=False)
    assert runner.run().done == 4
    changed = {p.parent.name + "/" + p.name for p, t in mtimes.items() if p.exists() and p.stat().st_mtime_ns != t}
    assert changed == set()  # nothing that existed was rewritten
    assert (run_dir / "samples" / "smoke-long" / "metrics.json").exists()
    assert judge.calls - calls == 2  # only smoke-long was judged again (2 repeats)


def test_a_run_folder_of_other_settings_is_refused(full_run, bench, engine, judge):
    cfg = config(judge, seed=123)
    runner = Runner(
        bench, EngineBackend(engine), Scorer(cfg.metrics, cfg.judge), cfg, full_run["run_dir"], show_progress=False
    )
    with pytest.raises(RunMismatch):
        runner.run()


def cli(argv: list[str]) -> tuple[int, str]:
    """`fashionchameleon eval ...` through services/eval/cli.py (as main.py wires it)."""
    parser = Parser(prog="fashionchameleon")
    eval_cli.register(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            args = parser.parse_args(argv)
            code = args.run(args)
    except CliError as e:
        return 2, str(e)
    return code, out.getvalue()


def test_compare_flags_a_planted_regression(full_run, tmp_path):
    a = full_run["run_dir"]
    code, out = cli(["eval", "compare", str(a), str(a)])
    assert code == 0 and "0 regressions" in out
    planted = json.loads((a / "report.json").read_text())
    planted["run_id"] = "candidate"
    planted["metrics"]["judge_lgc"]["value"] -= 0.5
    planted["metrics"]["backbone_fps"]["value"] *= 2  # an improvement must not hide it
    (tmp_path / "candidate.json").write_text(json.dumps(planted))
    code, out = cli(["eval", "compare", str(a), str(tmp_path / "candidate.json")])
    assert code == 1
    assert re.search(r"judge_lgc.*REGRESSION", out) and re.search(r"backbone_fps.*improved", out)
    assert "1 regression: judge_lgc" in out
    code, out = cli(["eval", "compare", str(a), str(tmp_path / "candidate.json"), "--tolerance", "judge_lgc=0.6"])
    assert code == 0
    code, out = cli(["eval", "compare", str(a), str(tmp_path / "candidate.json"), "--json"])
    assert code == 1 and json.loads(out)["regressions"] == ["judge_lgc"]
    assert cli(["eval", "compare", str(a), str(tmp_path / "nope")])[0] == 2


def test_cli_run_report_and_bad_input(tmp_path):
    code, out = cli(
        [
            "eval",
            "run",
            "--bench",
            "smoke",
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / "cli-run"),
            "--metrics",
            "flow,weightfree_quality",
            "--max-samples",
            "1",
            "--no-progress",
            "--store",
            str(tmp_path / "store"),
        ]
    )
    assert code == 0, out
    summary = json.loads(out)
    assert summary["samples"] == 1 and summary["failed"] == 0 and summary["metrics"]["motion_amplitude"] > 0
    assert "judge_hgc" not in summary["metrics"]  # group not selected
    stored = LocalObjectStore(LocalStoreConfig(root=tmp_path / "store"))
    assert stored.stat(summary["objects"]["html"]).size > 0
    code, out = cli(["eval", "report", str(tmp_path / "cli-run")])
    assert code == 0 and json.loads(out)["run_id"] == "cli-run"
    code, msg = cli(
        [
            "eval",
            "run",
            "--bench",
            "smoke",
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / "x"),
            "--metrics",
            "flow,telepathy",
        ]
    )
    assert code == 2 and "telepathy" in msg
    code, msg = cli(
        [
            "eval",
            "run",
            "--bench",
            "smoke",
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / "x"),
            "--judge-provider",
            "openai",
        ]
    )
    assert code == 2 and "--judge-url" in msg
    code, msg = cli(
        ["eval", "run", "--bench", str(tmp_path / "none.jsonl"), "--preset", "tiny", "--out", str(tmp_path / "x")]
    )
    assert code == 2 and "none.jsonl" in msg


# ---- the gRPC service ------------------------------------------------------------------------
class _Servicer(eval_pb2_grpc.EvalServicer):
    def __init__(self, svc: EvalService):
        self.svc = svc

    def RunBenchmark(self, request, context):
        return asyncio.run(self.svc.RunBenchmark(request, grpc_context=context))

    def GetReport(self, request, context):
        return asyncio.run(self.svc.GetReport(request, grpc_context=context))


def test_eval_service_over_grpc(tmp_path):
    cfg = {
        "storage": {"backend": "local", "local": {"root": str(tmp_path / "store"), "fsync": False}},
        "model": {"preset": "tiny"},
        "eval": {"work_dir": str(tmp_path / "work"), "metrics": {"groups": ["flow", "continuity"]}},
    }
    svc = EvalService(json.dumps(cfg))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    eval_pb2_grpc.add_EvalServicer_to_server(_Servicer(svc), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = eval_pb2_grpc.EvalStub(channel)
            run = stub.RunBenchmark(
                eval_pb2.RunBenchmarkRequest(smoke=True, run_id="svc-1", max_samples=2, label="grpc")
            )
            assert run.run_id == "svc-1" and run.samples_total == 2 and run.benchmark == "smoke"
            with pytest.raises(grpc.RpcError) as busy:  # one run at a time per replica
                stub.RunBenchmark(eval_pb2.RunBenchmarkRequest(smoke=True, run_id="svc-2"))
            assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            deadline = time.monotonic() + 120
            while True:
                rep = stub.GetReport(eval_pb2.GetReportRequest(run_id="svc-1", include_html=True))
                if rep.run.state != eval_pb2.EvalRun.RUNNING or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert rep.run.state == eval_pb2.EvalRun.DONE, rep.run.error_message
            assert rep.run.samples_done == 2 and rep.run.samples_failed == 0
            metrics = {m.key: m for m in rep.metrics}
            assert metrics["motion_amplitude"].has_value and metrics["motion_amplitude"].n == 2
            assert not metrics["motion_amplitude"].HasField("higher_is_better")
            assert metrics["backbone_fps"].higher_is_better and metrics["backbone_fps"].aggregate == "pooled"
            assert json.loads(rep.report_json)["label"] == "grpc"
            assert rep.html.startswith("<!doctype html>") and rep.html_key.endswith("svc-1/report.html")
            with pytest.raises(grpc.RpcError) as e:
                stub.GetReport(eval_pb2.GetReportRequest(run_id="nope"))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as e:
                stub.RunBenchmark(eval_pb2.RunBenchmarkRequest(smoke=True, metric_groups=["telepathy"]))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "telepathy" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                stub.RunBenchmark(eval_pb2.RunBenchmarkRequest(manifest_key="benches/missing.jsonl"))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop(None)
    # another replica (fresh service, same store) answers GetReport from the stored status
    other = EvalService(json.dumps(cfg))
    rep = asyncio.run(other.GetReport(eval_pb2.GetReportRequest(run_id="svc-1")))
    assert rep.run.state == eval_pb2.EvalRun.DONE and rep.json_key and not rep.html
