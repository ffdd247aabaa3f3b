"""Eval service: the `fashionchameleon.v1.Eval` gRPC API (RunBenchmark, GetReport) as a plain
class that Ray Serve deploys (like the encoder / decoder services).

Config: the suite's AppConfig JSON, optionally with an extra top-level "eval" object holding
an `EvalConfig` (runner, metrics, judge, tolerances, work_dir, report_prefix). The model the
benchmark runs through is the deployment's `model` section (checkpoint folder or preset),
loaded in this replica on the first run.

Runs execute in a background thread, one at a time per replica. Progress and the final state
are mirrored to the object store ({prefix}/runs/<run_id>/status.json) next to the reports, so
GetReport answers on any replica. Per-sample results stay in the replica's work_dir, which is
what makes RunBenchmark with an existing run_id resume.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from fashionchameleon.v1 import eval_pb2
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    abort_context,
    as_service_error,
)
from shared.config import AppConfig
from shared.storage import ObjectNotFound, open_store

from .backends import EngineBackend
from .bench import BenchError, Benchmark, load_benchmark
from .config import METRIC_GROUPS, EvalConfig
from .report import write_reports
from .runner import Progress, RunMismatch, Runner
from .scoring import Scorer
from .smoke import SMOKE_NAME, write_smoke_bench

log = logging.getLogger(__name__)
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_STATE = {"RUNNING": eval_pb2.EvalRun.RUNNING, "DONE": eval_pb2.EvalRun.DONE, "FAILED": eval_pb2.EvalRun.FAILED}


def split_config(config_json: str) -> tuple[AppConfig, EvalConfig]:
    data = json.loads(config_json)
    eval_section = data.pop("eval", None) or {}
    return AppConfig.model_validate(data), EvalConfig.model_validate(eval_section)


def _ts(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


@dataclass
class RunStatus:
    run_id: str
    state: str = "RUNNING"
    total: int = 0
    done: int = 0
    failed: int = 0
    error: str = ""
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    benchmark: str = ""
    benchmark_sha256: str = ""
    objects: dict[str, str] = field(default_factory=dict)

    def to_proto(self) -> eval_pb2.EvalRun:
        return eval_pb2.EvalRun(
            run_id=self.run_id,
            state=_STATE[self.state],
            samples_total=self.total,
            samples_done=self.done,
            samples_failed=self.failed,
            error_message=self.error,
            started_at=_ts(self.started_at),
            finished_at=_ts(self.finished_at),
            benchmark=self.benchmark,
            benchmark_sha256=self.benchmark_sha256,
        )


def metric_summaries(report: dict) -> list[eval_pb2.MetricSummary]:
    out = []
    for key, m in report.get("metrics", {}).items():
        msg = eval_pb2.MetricSummary(
            key=key,
            title=m["title"],
            has_value=m["value"] is not None,
            value=m["value"] or 0.0,
            aggregate=m["aggregate"],
            unit=m["unit"],
            n=m["n"],
            n_missing=m["n_missing"],
            n_unavailable=m["n_unavailable"],
            n_error=m["n_error"],
            status=m["status"],
            models=m["models"],
            reasons=[f"{r} ({n})" for r, n in m["reasons"].items()],
        )
        if m["higher_is_better"] is not None:
            msg.higher_is_better = m["higher_is_better"]
        out.append(msg)
    return out


class EvalService:
    def __init__(self, config_json: str):
        self.app_config, self.config = split_config(config_json)
        self.store = open_store(self.app_config.storage)
        self.prefix = self.config.report_prefix.rstrip("/")
        self._engine = None
        self._engine_lock = threading.Lock()
        self._runs: dict[str, RunStatus] = {}
        self._busy = threading.Lock()  # one run at a time per replica

    # ---- helpers -------------------------------------------------------------------------
    def _status_key(self, run_id: str) -> str:
        return f"{self.prefix}/runs/{run_id}/status.json"

    def _save_status(self, st: RunStatus) -> None:
        try:
            self.store.put_bytes(self._status_key(st.run_id), json.dumps(st.__dict__).encode(), "application/json")
        except Exception:
            log.exception("could not store eval run status %s", st.run_id)

    def _load_status(self, run_id: str) -> RunStatus | None:
        if run_id in self._runs:
            return self._runs[run_id]
        try:
            return RunStatus(**json.loads(self.store.get_bytes(self._status_key(run_id))))
        except ObjectNotFound:
            return None

    def engine(self):
        with self._engine_lock:
            if self._engine is None:
                from services.common.model import load_engine
                from shared.models.checkpoint import ALL_PARTS

                self._engine = load_engine(self.app_config.model, ALL_PARTS)
            return self._engine

    def _request_config(self, request: eval_pb2.RunBenchmarkRequest) -> EvalConfig:
        cfg = self.config
        if request.metric_groups:
            unknown = sorted(set(request.metric_groups) - set(METRIC_GROUPS))
            if unknown:
                raise InvalidArgument(
                    f"unknown metric groups {unknown}; known: {sorted(METRIC_GROUPS)}",
                    metadata={"field": "metric_groups"},
                )
            cfg = cfg.model_copy(
                update={"metrics": cfg.metrics.model_copy(update={"groups": tuple(request.metric_groups)})}
            )
        if request.judge_repeats < 0:
            raise InvalidArgument("judge_repeats must be >= 0", metadata={"field": "judge_repeats"})
        if request.judge_repeats:
            cfg = cfg.model_copy(update={"judge": cfg.judge.model_copy(update={"repeats": request.judge_repeats})})
        return cfg

    def _benchmark(self, request: eval_pb2.RunBenchmarkRequest, run_id: str) -> Benchmark:
        which = request.WhichOneof("benchmark")
        try:
            if which == "smoke" and request.smoke:
                manifest = write_smoke_bench(self.config.work_dir / "benches" / run_id)
                return load_benchmark(manifest, self.store, name=SMOKE_NAME)
            if which == "manifest_key" and request.manifest_key:
                return load_benchmark("object:" + request.manifest_key, self.store)
        except ObjectNotFound as e:
            raise NotFound(str(e), reason="OBJECT_NOT_FOUND", metadata={"key": e.key}) from None
        except BenchError as e:
            raise InvalidArgument(f"benchmark: {e}", metadata={"field": "manifest_key"}) from None
        raise InvalidArgument("give manifest_key or smoke", metadata={"field": "benchmark"})

    # ---- run -------------------------------------------------------------------------------
    def _start(self, request: eval_pb2.RunBenchmarkRequest) -> eval_pb2.EvalRun:
        run_id = request.run_id or time.strftime("run-%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)
        if not _RUN_ID.match(run_id):
            raise InvalidArgument(f"run_id must match {_RUN_ID.pattern}", metadata={"field": "run_id"})
        if request.max_samples < 0:
            raise InvalidArgument("max_samples must be >= 0", metadata={"field": "max_samples"})
        cfg = self._request_config(request)
        if not self._busy.acquire(blocking=False):
            raise ResourceExhausted("an eval run is already in progress on this replica", retry_after_s=60.0)
        try:
            bench = self._benchmark(request, run_id)
            backend = EngineBackend(self.engine(), fps=cfg.runner.fps)
            runner = Runner(
                bench,
                backend,
                Scorer(cfg.metrics, cfg.judge),
                cfg,
                cfg.work_dir / "runs" / run_id,
                label=request.label,
                show_progress=False,
            )
            runner.open_run()  # refuse a mismatching run folder now, not in the background
            n = min(len(bench.samples), request.max_samples or len(bench.samples))
            st = RunStatus(run_id, total=n, benchmark=bench.name, benchmark_sha256=bench.sha256)
        except RunMismatch as e:
            self._busy.release()
            raise FailedPrecondition(str(e), metadata={"run_id": run_id}) from None
        except BaseException:
            self._busy.release()
            raise
        self._runs[run_id] = st
        self._save_status(st)
        threading.Thread(
            target=self._run, args=(runner, bench, st, request.max_samples or None), name=f"eval-{run_id}", daemon=True
        ).start()
        return st.to_proto()

    def _run(self, runner: Runner, bench: Benchmark, st: RunStatus, max_samples: int | None) -> None:
        last = [0.0]

        def progress(p: Progress) -> None:
            st.done, st.failed = p.done, p.failed
            if time.monotonic() - last[0] > 5 or p.done == p.total:
                last[0] = time.monotonic()
                self._save_status(st)

        runner.on_progress = progress
        try:
            runner.run(max_samples=max_samples)
            report = write_reports(runner.run_dir, bench, self.store, self.prefix)
            st.objects = report.get("objects", {})
            st.state = "DONE"
        except Exception as e:
            log.exception("eval run %s failed", st.run_id)
            st.state, st.error = "FAILED", f"{type(e).__name__}: {e}"
        finally:
            st.finished_at = time.time()
            self._save_status(st)
            self._busy.release()

    def _report(self, request: eval_pb2.GetReportRequest) -> eval_pb2.EvalReport:
        if not _RUN_ID.match(request.run_id or ""):
            raise InvalidArgument("run_id is missing or malformed", metadata={"field": "run_id"})
        st = self._load_status(request.run_id)
        if st is None:
            raise NotFound(f"eval run {request.run_id} not found", metadata={"run_id": request.run_id})
        out = eval_pb2.EvalReport(run=st.to_proto())
        if st.state != "DONE" or not st.objects:
            return out
        try:
            report_json = self.store.get_bytes(st.objects["json"]).decode()
            html = self.store.get_bytes(st.objects["html"]).decode() if request.include_html else ""
        except ObjectNotFound as e:
            raise NotFound(f"report object missing: {e}", reason="OBJECT_NOT_FOUND", metadata={"key": e.key}) from None
        out.metrics.extend(metric_summaries(json.loads(report_json)))
        out.report_json = report_json
        out.json_key, out.markdown_key, out.html_key = st.objects["json"], st.objects["markdown"], st.objects["html"]
        out.html = html
        return out

    # ---- RPCs (Ray Serve handles and gRPC use the same names) -------------------------------
    async def _call(self, grpc_context, empty, fn, request):
        try:
            return await asyncio.to_thread(fn, request)
        except Exception as exc:
            err = as_service_error(exc)
            if grpc_context is None:
                raise err from exc
            abort_context(grpc_context, err)
            return empty()

    async def RunBenchmark(self, request: eval_pb2.RunBenchmarkRequest, grpc_context=None) -> eval_pb2.EvalRun:
        return await self._call(grpc_context, eval_pb2.EvalRun, self._start, request)

    async def GetReport(self, request: eval_pb2.GetReportRequest, grpc_context=None) -> eval_pb2.EvalReport:
        return await self._call(grpc_context, eval_pb2.EvalReport, self._report, request)

    def wait(self, run_id: str, timeout_s: float = 600.0) -> RunStatus:
        """Block until a run of this replica leaves RUNNING (tests and the CLI)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = self._runs.get(run_id)
            if st is None or st.state != "RUNNING":
                return st
            time.sleep(0.05)
        raise TimeoutError(f"eval run {run_id} still running after {timeout_s} s")


__all__ = ["EvalService", "ServiceError", "split_config"]
