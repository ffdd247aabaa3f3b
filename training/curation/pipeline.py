"""The curation run as a Ray Data pipeline: streaming, resumable, one machine or a cluster.

    videos (keys under input_prefix)
      -> flat_map segment      (one task per raw video; sub-clips to _work/clips/)
      -> map filter            (CPU: person, DIS flow, quality/aesthetics)
      -> map caption / garment / reference   (I/O bound: VLM and image-edit endpoints)
      -> map finalize          (copy the triplet to samples/)
      -> driver: manifest.jsonl, report/

Rows are {"clip_id", "record": ClipRecord JSON}: a fixed schema whatever a record holds.
Dropped records pass through the later stages untouched so the driver sees every clip.

Resume: every stage writes the record it produced to _state/clips/{clip_id}/{stage}.json (and
stage 1 the video's sub-clip list to _state/videos/{video_id}.json) in the output store, and
first looks there: re-running the same command after an interruption redoes only unfinished
work; the VLM answer cache covers questions asked by a stage that did not finish. The state is
keyed by ids, not by config: change thresholds -> use a new output prefix (or delete _state/).
An unexpected exception in a stage drops the clip with "{stage}:error" *without* persisting
it, so a re-run retries it; `fail_fast=True` raises instead (debugging).

Ray: `run(cfg)` uses the running Ray instance or starts a local one (`ray.init()` with the
given address); on a cluster every worker opens the stores from the config itself.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shared.storage.base import ObjectNotFound

from . import stages
from .config import CurationConfig
from .records import ClipRecord, from_row, row, video_id
from .report import write_report

log = logging.getLogger(__name__)

StageFn = Callable[[stages.Context, ClipRecord], ClipRecord]
CLIP_STAGES: tuple[tuple[str, StageFn], ...] = (
    ("filter", stages.filter_clip),
    ("caption", stages.caption_clip),
    ("garment", stages.garment_clip),
    ("reference", stages.reference_clip),
    ("finalize", stages.finalize_clip),
)


def list_videos(cfg: CurationConfig) -> list[str]:
    ctx = stages.Context.get(cfg)
    exts = tuple(e.lower() for e in cfg.video_extensions)
    return sorted(i.key for i in ctx.input_store.list(cfg.input_prefix) if i.key.lower().endswith(exts))


def segment_row(cfg: CurationConfig, fail_fast: bool, r: dict) -> list[dict]:
    ctx = stages.Context.get(cfg)
    key = r["video_key"]
    state = ctx.layout.video_state(video_id(key))
    try:
        return [{"clip_id": c["clip_id"], "record": json.dumps(c, sort_keys=True)}
                for c in json.loads(ctx.store.get_bytes(state))]  # fmt: skip
    except ObjectNotFound:
        pass
    try:
        recs = stages.segment_video(ctx, key)
    except Exception as e:  # one bad video must not stop the run
        if fail_fast:
            raise
        vid = video_id(key)
        return [row(ClipRecord(f"{vid}-error", key, vid, 0.0, 0, 0).drop("segment", "error", repr(e)[:300]))]
    payload = "[" + ",".join(rec.to_json() for rec in recs) + "]"
    ctx.store.put_bytes(state, payload.encode(), content_type="application/json")  # sub-clips are written first
    return [row(rec) for rec in recs]


def stage_row(cfg: CurationConfig, stage: str, fn: StageFn, fail_fast: bool, r: dict) -> dict:
    rec = from_row(r)
    if not rec.pending:
        return r
    ctx = stages.Context.get(cfg)
    state = ctx.layout.clip_state(rec.clip_id, stage)
    try:
        return {"clip_id": rec.clip_id, "record": ctx.store.get_bytes(state).decode()}
    except ObjectNotFound:
        pass
    try:
        rec = fn(ctx, rec)
    except Exception as e:  # recorded, not persisted: a re-run retries it
        if fail_fast:
            raise
        log.exception("stage %s failed on %s", stage, rec.clip_id)
        return row(rec.drop(stage, "error", repr(e)[:300]))
    if rec.pending:
        rec.stage = stage
    ctx.store.put_bytes(state, rec.to_json().encode(), content_type="application/json")
    return row(rec)


def build_dataset(cfg: CurationConfig, keys: list[str], fail_fast: bool = False):
    """The lazy Ray Dataset of final rows (one per sub-clip, kept or dropped)."""
    import ray.data

    ds = ray.data.from_items([{"video_key": k} for k in keys], override_num_blocks=max(1, len(keys)))
    ds = ds.flat_map(functools.partial(segment_row, cfg, fail_fast))
    for stage, fn in CLIP_STAGES:
        io_bound = stage != "filter"
        conc = cfg.remote_concurrency if io_bound else cfg.filter_concurrency
        opts: dict = {"num_cpus": 0.25 if io_bound else 1}
        if conc is not None:
            opts["concurrency"] = conc
        ds = ds.map(functools.partial(stage_row, cfg, stage, fn, fail_fast), **opts)
    return ds


@dataclass
class RunResult:
    records: list[ClipRecord]
    report: dict
    manifest_key: str
    seconds: float

    @property
    def kept(self) -> list[ClipRecord]:
        return [r for r in self.records if r.status == "kept"]


def check_ready(cfg: CurationConfig) -> None:
    """Refuse to start a run that cannot finish (no VLM or edit endpoint configured)."""
    missing = [name for name, ok in (("vlm", cfg.vlm.configured), ("try_off", cfg.try_off.configured),
                                     ("try_on", cfg.try_on.configured)) if not ok]  # fmt: skip
    if missing:
        raise ValueError(f"curation needs endpoints for: {', '.join(missing)} (base_url/model)")


def run(
    cfg: CurationConfig, *, ray_address: str | None = None, fail_fast: bool = False, progress: bool = False
) -> RunResult:
    """Curate every video under the input prefix; writes manifest.jsonl and report/ at the end.

    `progress`: one bar on stderr counting the finished sub-clips (kept / dropped), in place of
    Ray Data's per-operator bars (a video's number of sub-clips is known only once it is cut)."""
    import ray

    check_ready(cfg)
    t0 = time.monotonic()
    if not ray.is_initialized():
        ray.init(address=ray_address, log_to_driver=False)
    keys = list_videos(cfg)
    ds = build_dataset(cfg, keys, fail_fast)
    finished = (from_row(r) for r in ds.iter_rows())
    if progress:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        finished = _counted(finished, len(keys))
    records = sorted(finished, key=lambda r: r.clip_id)
    ctx = stages.Context.get(cfg)
    kept = [r for r in records if r.status == "kept"]
    manifest = "".join(stages.manifest_line(r) + "\n" for r in kept)
    manifest_key = ctx.layout.key("manifest.jsonl")
    report = write_report(ctx, records, videos=len(keys))
    ctx.store.put_bytes(manifest_key, manifest.encode(), content_type="application/x-ndjson")  # last: marks done
    return RunResult(records, report, manifest_key, time.monotonic() - t0)


def _counted(records: Iterator[ClipRecord], videos: int) -> Iterator[ClipRecord]:
    """`records` as they finish, counted on stderr: `curate: N clip [..., k kept, d dropped, from V videos]`."""
    from tqdm import tqdm

    kept = 0
    with tqdm(desc="curate", unit="clip", dynamic_ncols=True) as bar:
        for i, rec in enumerate(records, start=1):
            kept += rec.status == "kept"
            bar.set_postfix_str(f"{kept} kept, {i - kept} dropped, from {videos} videos", refresh=False)
            bar.update(1)
            yield rec


def export_folder(cfg: CurationConfig, local_dir: str | Path) -> Path:
    """Copy manifest.jsonl and the kept samples of a finished run into a plain folder (the
    layout `training.data.preprocess.read_manifest` reads); returns the manifest's path."""
    ctx = stages.Context.get(cfg)
    root = Path(local_dir)
    root.mkdir(parents=True, exist_ok=True)
    text = ctx.store.get_bytes(ctx.layout.key("manifest.jsonl")).decode()
    for line in text.splitlines():
        entry = json.loads(line)
        for field in ("reference", "garment", "video"):
            ctx.store.get_file(ctx.layout.key(entry[field]), root / entry[field])
    (root / "manifest.jsonl").write_text(text)
    return root / "manifest.jsonl"
