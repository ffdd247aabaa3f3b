"""The benchmark runner: generate every sample, score it, keep per-sample results on disk.

Run folder layout (one folder per run; its name is the run id):

    run.json                       identity: benchmark sha256, backend, generation settings
    samples/<id>/video.mp4         the generated video (cut to the sample's length)
    samples/<id>/generation.json   timings, segments, switches (GenerationRecord)
    samples/<id>/metrics.json      metric results + the fingerprint of the metric settings
    samples/<id>/error.json        the last generation failure (retried on resume)
    report.{json,md,html}          written by `services.eval.report`

Resume: rerunning into the same folder skips samples whose video and generation.json exist
and re-scores only samples whose metrics.json is missing or was produced with different
metric / judge settings. A folder made by a different benchmark, backend or generation
setting is refused (`RunMismatch`): numbers from two models must never mix. Every file is
written atomically (temp file + rename), so an interrupted run leaves no half file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import Backend, GenerationRecord
from .bench import Benchmark, Sample, check_samples
from .config import EvalConfig
from .metrics.base import MetricResult, SampleVideo, Segment
from .scoring import Scorer

RUN_FILE = "run.json"
FORMAT_VERSION = 1


class RunMismatch(ValueError):
    """The run folder holds results of a different benchmark / backend / generation setting."""


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=str)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; reports are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def metrics_fingerprint(cfg: EvalConfig) -> str:
    judge = cfg.judge.model_dump(mode="json", exclude={"api_key", "timeout_s", "backoff_s", "max_backoff_s"})
    return fingerprint({"metrics": cfg.metrics.model_dump(mode="json"), "judge": judge})


@dataclass
class Progress:
    total: int
    done: int = 0
    failed: int = 0
    scored: int = 0  # samples (re)scored in this call
    current: str | None = None


class Runner:
    def __init__(
        self,
        bench: Benchmark,
        backend: Backend,
        scorer: Scorer,
        cfg: EvalConfig,
        run_dir: str | Path,
        *,
        label: str = "",
        show_progress: bool = True,
        on_progress: Callable[[Progress], None] | None = None,
    ):
        self.bench = bench
        self.backend = backend
        self.scorer = scorer
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.label = label
        self.show_progress = show_progress
        self.on_progress = on_progress
        self._lock = threading.Lock()

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    def sample_dir(self, sample_id: str) -> Path:
        return self.run_dir / "samples" / sample_id

    def identity(self) -> dict:
        r = self.cfg.runner
        return {
            "benchmark": {"name": self.bench.name, "sha256": self.bench.sha256},
            "backend": self.backend.describe(),
            "generation": {"default_frames": r.default_frames, "seed": r.seed, "fps": r.fps},
        }

    def open_run(self) -> None:
        ident = self.identity()
        path = self.run_dir / RUN_FILE
        existing = read_json(path)
        if existing is not None:
            if existing.get("identity") != json.loads(json.dumps(ident, default=str)):
                raise RunMismatch(
                    f"{self.run_dir} holds a run of a different benchmark, backend or generation setting; "
                    "use a new run folder"
                )
            return
        write_json_atomic(
            path,
            {
                "format_version": FORMAT_VERSION,
                "run_id": self.run_id,
                "label": self.label,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "identity": ident,
            },
        )

    # ---- one sample ----------------------------------------------------------------------
    def _generation(self, sample: Sample) -> GenerationRecord:
        d = self.sample_dir(sample.id)
        video = d / "video.mp4"
        saved = read_json(d / "generation.json")
        if saved is not None and video.is_file():
            return GenerationRecord.from_dict(saved)
        d.mkdir(parents=True, exist_ok=True)
        frames = sample.frames or self.cfg.runner.default_frames
        seed = self.cfg.runner.seed if sample.seed is None else sample.seed
        record = self.backend.generate(self.bench, sample, video, frames, seed)
        write_json_atomic(d / "generation.json", record.to_dict())
        return record

    def video_of(self, sample: Sample, record: GenerationRecord) -> SampleVideo:
        from shared.media.video import read_frames

        frames = read_frames(self.sample_dir(sample.id) / "video.mp4")[: record.frames]  # uint8 [T, H, W, 3]
        segments = [
            Segment(s["start"], s["end"], self.bench.image(s["garment"]), s["garment"]) for s in record.segments
        ]
        return SampleVideo(sample.id, frames, record.fps, self.bench.image(sample.reference), sample.prompt, segments)

    def _metrics(self, sample: Sample, record: GenerationRecord) -> bool:
        """Score unless up to date; True if scored now."""
        path = self.sample_dir(sample.id) / "metrics.json"
        fp = metrics_fingerprint(self.cfg)
        saved = read_json(path)
        if saved is not None and saved.get("fingerprint") == fp:
            return False
        results = self.scorer.score(self.video_of(sample, record))
        write_json_atomic(path, {"fingerprint": fp, "results": [r.to_dict() for r in results]})
        return True

    def _process(self, sample: Sample) -> tuple[str, str | None, bool]:
        """(sample id, failure or None, scored now). Failures are recorded and retried on resume."""
        stage = "generation"
        try:
            record = self._generation(sample)
            stage = "scoring"
            scored = self._metrics(sample, record)
        except Exception as e:  # noqa: BLE001 - record, keep going
            reason = f"{stage}: {type(e).__name__}: {e}"
            write_json_atomic(self.sample_dir(sample.id) / "error.json", {"stage": stage, "error": reason})
            return sample.id, reason, False
        (self.sample_dir(sample.id) / "error.json").unlink(missing_ok=True)
        return sample.id, None, scored

    # ---- the run -------------------------------------------------------------------------
    def run(self, max_samples: int | None = None, check_images: bool = True) -> Progress:
        samples = self.bench.samples[:max_samples] if max_samples else self.bench.samples
        if check_images:
            check_samples(self.bench, self.backend.plan(), self.cfg.runner.default_frames, tuple(samples))
        self.open_run()
        progress = Progress(total=len(samples))
        bar = None
        if self.show_progress:
            from tqdm import tqdm

            bar = tqdm(
                total=len(samples), desc=f"eval {self.run_id}", unit="sample", file=sys.stderr, dynamic_ncols=True
            )
        pool = ThreadPoolExecutor(max_workers=self.cfg.runner.concurrency, thread_name_prefix="eval")
        try:
            futures = {pool.submit(self._process, s): s.id for s in samples}
            for fut in as_completed(futures):
                sid, err, scored = fut.result()
                with self._lock:
                    progress.done += 1
                    progress.failed += err is not None
                    progress.scored += scored
                    progress.current = sid
                if bar is not None:
                    bar.update(1)
                    if err:
                        bar.write(f"sample {sid} failed: {err}", file=sys.stderr)
                if self.on_progress is not None:
                    self.on_progress(progress)
        except BaseException:  # Ctrl-C / a crash: drop queued samples; the ones in flight finish
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)
            if bar is not None:
                bar.close()
        return progress


def load_sample_results(
    run_dir: Path, sample_id: str
) -> tuple[GenerationRecord | None, list[MetricResult], str | None]:
    d = Path(run_dir) / "samples" / sample_id
    gen = read_json(d / "generation.json")
    met = read_json(d / "metrics.json")
    err = read_json(d / "error.json")
    return (
        GenerationRecord.from_dict(gen) if gen else None,
        [MetricResult.from_dict(r) for r in (met or {}).get("results", [])],
        (err or {}).get("error"),
    )
