"""Reports of a run folder: JSON (the source of truth), Markdown and a self-contained HTML page.

Aggregation rules:
- quality metrics: mean (and std / median / min / max) over the samples whose result is ok;
  missing, unavailable and error results are counted and their reasons listed, never folded
  into the mean;
- backbone_fps / end_to_end_fps: pooled over the run (all pixel frames / all seconds), not a
  mean of per-sample rates;
- time_to_first_chunk_seconds / switch_latency_seconds: median (p50) with p95 alongside.
A metric with no ok value anywhere has status "unavailable" (or "missing" / "error") and the
reasons, so a reader sees why a column is empty.

The HTML page inlines everything (CSS, matplotlib histograms, each sample's video with a marker
per garment switch on a clickable timeline, and per-sample frame strips as base64): one file
that opens anywhere, no network.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .backends import ENGINE_TIMING, GenerationRecord
from .bench import Benchmark
from .html_video import CSS as VIDEO_CSS
from .html_video import SCRIPT as VIDEO_SCRIPT
from .html_video import Switch, video_with_switches
from .metrics.base import METRIC_INFO, MetricInfo, MetricResult, sample_indices
from .runner import RUN_FILE, load_sample_results, read_json, write_json_atomic

REPORT_VERSION = 1
TIMING_DEFINITIONS = {
    "engine": {
        "backbone_fps": "pixel frames / DiT seconds (denoising + context pass), pooled; VAE decode excluded",
        "end_to_end_fps": "pixel frames / (DiT + streaming VAE decode) seconds, pooled over the run",
        "time_to_first_chunk_seconds": "session open (image + prompt encoding, cond pass) to first decoded chunk",
        "switch_latency_seconds": "compute time of each garment switch (encode, KV refresh/withdraw, disentangle)",
    },
    "studio": {
        "backbone_fps": "unavailable over the public API (no DiT seconds exposed)",
        "end_to_end_fps": "pixel frames / seconds from CreateSession to the last chunk received (paced servers cap it)",
        "time_to_first_chunk_seconds": "CreateSession call to first chunk received",
        "switch_latency_seconds": "SwitchGarment call to the first chunk wearing the new garment",
    },
}


# ---- per-sample performance ----------------------------------------------------------------
def perf_results(rec: GenerationRecord) -> list[MetricResult]:
    out = []
    if rec.backend == ENGINE_TIMING and rec.generate_seconds:
        out.append(MetricResult.ok("backbone_fps", rec.frames / rec.generate_seconds, "engine timing"))
    else:
        out.append(MetricResult.unavailable("backbone_fps", "the studio API does not expose DiT seconds"))
    if rec.backend == ENGINE_TIMING and rec.generate_seconds is not None and rec.decode_seconds is not None:
        e2e = rec.generate_seconds + rec.decode_seconds
    else:
        e2e = rec.total_seconds
    out.append(
        MetricResult.ok("end_to_end_fps", rec.frames / e2e, rec.backend)
        if e2e > 0
        else MetricResult.missing("end_to_end_fps", "zero duration", rec.backend)
    )
    if rec.time_to_first_chunk_seconds is not None:
        out.append(MetricResult.ok("time_to_first_chunk_seconds", rec.time_to_first_chunk_seconds, rec.backend))
    else:
        out.append(MetricResult.missing("time_to_first_chunk_seconds", "no chunk received", rec.backend))
    lat = [s["latency_seconds"] for s in rec.switches if s.get("latency_seconds") is not None]
    if rec.switches:
        if lat:
            out.append(MetricResult.ok("switch_latency_seconds", float(np.mean(lat)), rec.backend, each=lat))
        else:
            out.append(MetricResult.missing("switch_latency_seconds", "no switch was seen applied", rec.backend))
    return out


def _pooled(key: str, records: list[GenerationRecord]) -> tuple[int, float]:
    """(pixel frames, seconds) over the run for a pooled rate."""
    if key == "backbone_fps":
        eng = [r for r in records if r.backend == ENGINE_TIMING and r.generate_seconds]
        return sum(r.frames for r in eng), sum(r.generate_seconds for r in eng)
    secs = 0.0
    for r in records:
        engine = r.backend == ENGINE_TIMING and r.generate_seconds is not None and r.decode_seconds is not None
        secs += (r.generate_seconds + r.decode_seconds) if engine else r.total_seconds
    return sum(r.frames for r in records), secs


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarize(key: str, results: list[MetricResult], records: list[GenerationRecord]) -> dict[str, Any]:
    info = METRIC_INFO.get(key, MetricInfo(key, key, None))
    ok = [r.value for r in results if r.status == "ok"]
    counts = Counter(r.status for r in results)
    reasons = Counter(r.reason for r in results if r.status != "ok" and r.reason)
    models = sorted({r.model for r in results if r.model})
    s: dict[str, Any] = {
        "title": info.title,
        "higher_is_better": info.higher_is_better,
        "unit": info.unit,
        "n": len(ok),
        "n_missing": counts.get("missing", 0),
        "n_unavailable": counts.get("unavailable", 0),
        "n_error": counts.get("error", 0),
        "models": models,
        "reasons": dict(reasons.most_common()),
        "value": None,
        "aggregate": "mean",
    }
    if key == "face_similarity":
        faceless = sum(1 for r in results if r.status == "ok" and r.details.get("faces_detected") == 0)
        if faceless:
            s["notes"] = [
                f"{faceless} sample(s) had no detectable face in any sampled frame and score 0 "
                "(OpenS2V convention: identity lost)"
            ]
    if not ok:
        s["status"] = (
            max(("unavailable", "missing", "error"), key=lambda st: counts.get(st, 0)) if results else "missing"
        )
        return s
    s["status"] = "ok" if len(ok) == len(results) else "partial"
    arr = np.asarray(ok, dtype=np.float64)
    s.update(
        mean=float(arr.mean()),
        std=float(arr.std()),
        median=float(np.median(arr)),
        min=float(arr.min()),
        max=float(arr.max()),
        value=float(arr.mean()),
    )
    if key in ("backbone_fps", "end_to_end_fps"):
        frames, secs = _pooled(key, records)
        if secs > 0:
            s.update(value=frames / secs, aggregate="pooled")
    elif key in ("time_to_first_chunk_seconds", "switch_latency_seconds"):
        each = (
            ok
            if key == "time_to_first_chunk_seconds"
            else [v for r in results if r.status == "ok" for v in r.details.get("each", [r.value])]
        )
        s.update(value=_pct(each, 50), p95=_pct(each, 95), aggregate="p50")
    return s


# ---- building ------------------------------------------------------------------------------
def build_report(run_dir: str | Path, bench: Benchmark | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run = read_json(run_dir / RUN_FILE)
    if run is None:
        raise FileNotFoundError(f"{run_dir} is not a run folder (no {RUN_FILE})")
    ident = run["identity"]
    ids = (
        [s.id for s in bench.samples]
        if bench is not None
        else sorted(p.name for p in (run_dir / "samples").iterdir() if p.is_dir())
        if (run_dir / "samples").is_dir()
        else []
    )
    interactive = {s.id: s.interactive for s in bench.samples} if bench is not None else {}
    per_key: dict[str, list[MetricResult]] = {}
    samples, records = [], []
    for sid in ids:
        rec, results, err = load_sample_results(run_dir, sid)
        if rec is None:
            samples.append({"id": sid, "status": "failed" if err else "pending", "error": err})
            continue
        records.append(rec)
        all_results = results + perf_results(rec)
        for r in all_results:
            per_key.setdefault(r.key, []).append(r)
        judge = next((r for r in results if r.key == "judge_hgc"), None)
        cont = next((r for r in results if r.key == "switch_continuity"), None)
        samples.append(
            {
                "id": sid,
                "status": "ok" if results else "unscored",
                "error": err,
                "interactive": interactive.get(sid, len(rec.segments) > 1),
                "frames": rec.frames,
                "fps": rec.fps,
                "values": {r.key: r.value for r in all_results},
                "statuses": {r.key: r.status for r in all_results},
                "reasons": {r.key: r.reason for r in all_results if r.reason},
                "segments": (judge.details.get("segments") if judge else None)
                or [{"start_frame": s["start"], "end_frame": s["end"], "garment": s["garment"]} for s in rec.segments],
                "switches": rec.switches,
                "switch_boundaries": cont.details.get("boundaries", []) if cont else [],
                "timing": {
                    "time_to_first_chunk_seconds": rec.time_to_first_chunk_seconds,
                    "total_seconds": rec.total_seconds,
                    "generate_seconds": rec.generate_seconds,
                    "decode_seconds": rec.decode_seconds,
                },
            }
        )
    order = [k for k in METRIC_INFO if k in per_key] + sorted(k for k in per_key if k not in METRIC_INFO)
    backend = ident["backend"].get("backend", "engine")
    return {
        "format_version": REPORT_VERSION,
        "run_id": run["run_id"],
        "label": run.get("label", ""),
        "created_at": run.get("created_at"),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "benchmark": {
            **ident["benchmark"],
            "samples": len(ids),
            "generated": len(records),
            "failed": sum(s["status"] == "failed" for s in samples),
        },
        "backend": ident["backend"],
        "generation": ident["generation"],
        "timing_definitions": TIMING_DEFINITIONS.get(backend, {}),
        "metrics": {k: summarize(k, per_key[k], records) for k in order},
        "samples": samples,
    }


# ---- Markdown ------------------------------------------------------------------------------
def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _arrow(h: bool | None) -> str:
    return "↑" if h is True else "↓" if h is False else ""


def _status_note(m: dict) -> str:
    notes = "".join(f" — {n}" for n in m.get("notes", []))
    if m["status"] in ("ok",):
        return ", ".join(m["models"]) + notes
    reasons = "; ".join(f"{r} ({n})" for r, n in m["reasons"].items())
    if m["status"] != "partial":
        return f"**{m['status']}**: {reasons}"
    return f"{', '.join(m['models'])} — {reasons}{notes}"


def to_markdown(report: dict) -> str:
    b = report["benchmark"]
    lines = [
        f"# Eval report `{report['run_id']}`" + (f" — {report['label']}" if report["label"] else ""),
        "",
        f"- benchmark: **{b['name']}** (sha256 `{b['sha256'][:12]}`), {b['samples']} samples, "
        f"{b['generated']} generated, {b['failed']} failed",
        "- backend: " + ", ".join(f"{k}={v}" for k, v in report["backend"].items() if not isinstance(v, dict)),
        f"- created {report['created_at']}, report {report['generated_at']}",
        "",
        "## Metrics",
        "",
        "| metric | value | n | missing/unavail./error | model / notes |",
        "|---|---:|---:|---:|---|",
    ]
    for key, m in report["metrics"].items():
        unit = f" {m['unit']}" if m["unit"] else ""
        agg = "" if m["aggregate"] == "mean" else f" ({m['aggregate']})"
        lines.append(
            f"| {m['title']} {_arrow(m['higher_is_better'])} `{key}` | {fmt(m['value'])}{unit}{agg} | {m['n']} | "
            f"{m['n_missing']}/{m['n_unavailable']}/{m['n_error']} | {_status_note(m).replace('|', '/')} |"
        )
    if report.get("timing_definitions"):
        lines += ["", "## Timing definitions", ""]
        lines += [f"- `{k}`: {v}" for k, v in report["timing_definitions"].items()]
    keys = [k for k in report["metrics"] if k not in ("switch_latency_seconds",)][:12]
    lines += [
        "",
        "## Samples",
        "",
        "| sample | " + " | ".join(f"`{k}`" for k in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for s in report["samples"]:
        if s["status"] in ("failed", "pending"):
            lines.append(f"| {s['id']} | **{s['status']}**: {s.get('error') or ''} |")
            continue
        lines.append(f"| {s['id']} | " + " | ".join(fmt(s["values"].get(k), 3) for k in keys) + " |")
    inter = [s for s in report["samples"] if s.get("interactive") and s["status"] not in ("failed", "pending")]
    if inter:
        lines += ["", "## Interactive runs", ""]
        for s in inter:
            lines.append(f"### {s['id']}")
            lines.append("")
            lines.append("| segment (frames) | garment | HGC | LGC | NTP |")
            lines.append("|---|---|---:|---:|---:|")
            for seg in s["segments"]:
                sc = seg.get("scores") or {}
                lines.append(
                    f"| {seg['start_frame']}–{seg['end_frame']} | `{seg['garment']}` | "
                    f"{fmt(sc.get('judge_hgc'), 2)} | {fmt(sc.get('judge_lgc'), 2)} | {fmt(sc.get('judge_ntp'), 2)} |"
                )
            for bnd in s["switch_boundaries"]:
                lines.append(
                    f"\n- switch at frame {bnd['frame']}: continuity {fmt(bnd['continuity'], 3)} "
                    f"(boundary flow {fmt(bnd['cross_flow_px'], 2)} px vs local {fmt(bnd['local_flow_px'], 2)} px)"
                )
            for sw in s["switches"]:
                lines.append(
                    f"- switch planned at chunk {sw['planned_chunk']}, effective at chunk "
                    f"{sw.get('effective_chunk')}, latency {fmt(sw.get('latency_seconds'), 3)} s"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


# ---- HTML ----------------------------------------------------------------------------------
def _png_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _tick_label_for(ax):
    """Tick labels with as many decimals as the tick spacing needs (1.72 / 1.725, not 1.72 / 1.72),
    large values as 1.2k: distinct and short, so neighbours do not run into each other."""

    def label(x: float, _pos) -> str:
        ticks = [t for t in ax.get_xticks() if math.isfinite(t)]
        step = min((b - a for a, b in itertools.pairwise(ticks) if b > a), default=abs(x) or 1.0)
        if max(abs(t) for t in ticks or [x]) >= 10_000:
            return f"{x / 1000:.{max(0, -math.floor(math.log10(step / 1000)))}f}k"
        return f"{x:.{max(0, -math.floor(math.log10(step)))}f}"

    return label


def histograms(report: dict) -> dict[str, str]:
    """Per metric with at least one value: a base64 PNG histogram of the per-sample values."""
    try:
        import matplotlib
    except ImportError:
        return {}  # the page says so; the numbers are all in the tables
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    out = {}
    for key, m in report["metrics"].items():
        vals = [s["values"].get(key) for s in report["samples"] if s.get("values")]
        vals = [v for v in vals if v is not None]
        if not vals:
            continue
        fig, ax = plt.subplots(figsize=(3.6, 2.4))
        try:
            ax.hist(vals, bins=min(20, max(3, len(vals))), color="#4c72b0", edgecolor="white")
        except ValueError:  # values equal up to rounding: numpy cannot split the range into bins
            pad = max(abs(max(vals)) * 1e-3, 1e-9)
            ax.hist(vals, bins=1, range=(min(vals) - pad, max(vals) + pad), color="#4c72b0", edgecolor="white")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(m.get("unit") or "value", fontsize=8)
        ax.set_ylabel("samples", fontsize=8)
        # few ticks and compact numbers: long tick labels (fps, seconds) no longer run into each other
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(_tick_label_for(ax)))
        ax.tick_params(labelsize=7)
        if m["value"] is not None:
            ax.axvline(m["value"], color="#c44e52", linewidth=1)
        fig.tight_layout()
        out[key] = _png_b64(fig)
        plt.close(fig)
    return out


def _thumb(img: Image.Image | np.ndarray, h: int) -> Image.Image:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    img = img.convert("RGB")
    return img.resize((max(1, round(img.width * h / img.height)), h), Image.BICUBIC)


def frame_strip(frames: np.ndarray, refs: list[Image.Image], boundaries: list[int], n: int = 6, h: int = 96) -> str:
    """Base64 JPEG: reference / garment thumbnails, then `n` frames; red bars before the first
    frame of each new garment segment."""
    idx = sample_indices(len(frames), n)
    tiles = [(_thumb(r, h), False) for r in refs]
    gap = 6
    for j, i in enumerate(idx):
        prev = idx[j - 1] if j else -1
        tiles.append((_thumb(frames[i], h), any(prev < b <= i for b in boundaries)))
    width = sum(t.width for t, _ in tiles) + gap * (len(tiles) + 1)
    strip = Image.new("RGB", (width, h + 2 * gap), (245, 245, 245))
    x = gap
    for k, (t, mark) in enumerate(tiles):
        if mark:
            strip.paste((200, 40, 40), (x - gap + 1, 0, x - 1, h + 2 * gap))
        strip.paste(t, (x, gap))
        x += t.width + gap
        if k == len(refs) - 1:
            x += gap  # wider gap between inputs and frames
    buf = io.BytesIO()
    strip.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = (
    """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top} td.num{text-align:right}
th{background:#f4f4f4} .bad{color:#b00} .muted{color:#777;font-size:12px}
.grid{display:flex;flex-wrap:wrap;gap:8px} .sample{margin:12px 0}
code{background:#f4f4f4;padding:0 3px}
"""
    + VIDEO_CSS
)


def to_html(
    report: dict,
    strips: dict[str, str] | None = None,
    hists: dict[str, str] | None = None,
    videos: dict[str, str] | None = None,
) -> str:
    """The page; `videos`: sample id -> its `<video>` with the switch timeline (`sample_videos`)."""
    e = html.escape
    videos = videos or {}
    b = report["benchmark"]
    hists = histograms(report) if hists is None else hists
    strips = strips or {}
    rows = []
    for key, m in report["metrics"].items():
        cls = "" if m["status"] in ("ok", "partial") else ' class="bad"'
        note = (
            e(", ".join(m["models"]))
            if m["status"] == "ok"
            else e("; ".join(f"{r} ({n})" for r, n in m["reasons"].items()))
        )
        if m["status"] == "partial":
            note = e(", ".join(m["models"])) + " — " + note
        if m["status"] not in ("ok", "partial"):
            note = f"<b>{e(m['status'])}</b>: {note}"
        note += "".join(f"<br><span class=muted>{e(n)}</span>" for n in m.get("notes", []))
        agg = "" if m["aggregate"] == "mean" else f" <span class='muted'>({e(m['aggregate'])})</span>"
        rows.append(
            f"<tr{cls}><td>{e(m['title'])} {_arrow(m['higher_is_better'])}<br><code>{e(key)}</code></td>"
            f"<td class=num>{e(fmt(m['value']))} {e(m['unit'])}{agg}</td><td class=num>{m['n']}</td>"
            f"<td class=num>{m['n_missing']}/{m['n_unavailable']}/{m['n_error']}</td><td>{note}</td></tr>"
        )
    keys = [k for k in report["metrics"]][:14]
    srows = []
    for s in report["samples"]:
        if s["status"] in ("failed", "pending"):
            srows.append(
                f"<tr class=bad><td>{e(s['id'])}</td><td colspan={len(keys)}>{e(s['status'])}: "
                f"{e(s.get('error') or '')}</td></tr>"
            )
            continue
        cells = "".join(
            f"<td class=num title='{e(s['reasons'].get(k, ''))}'>{e(fmt(s['values'].get(k), 3))}</td>" for k in keys
        )
        srows.append(f"<tr><td><a href='#s-{e(s['id'])}'>{e(s['id'])}</a></td>{cells}</tr>")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Eval {e(report['run_id'])}</title><style>{_CSS}</style>{VIDEO_SCRIPT}</head><body>",
        f"<h1>Eval report <code>{e(report['run_id'])}</code> {e(report['label'])}</h1>",
        f"<p>Benchmark <b>{e(b['name'])}</b> (sha256 <code>{e(b['sha256'][:12])}</code>): {b['samples']} samples, "
        f"{b['generated']} generated, {b['failed']} failed.<br>Backend: "
        + e(", ".join(f"{k}={v}" for k, v in report["backend"].items() if not isinstance(v, dict)))
        + f"<br><span class=muted>created {e(str(report['created_at']))}, "
        f"report {e(report['generated_at'])}</span></p>",
        "<h2>Metrics</h2><table><tr><th>metric</th><th>value</th><th>n</th><th>missing/unavail./error</th>"
        "<th>model / notes</th></tr>" + "".join(rows) + "</table>",
    ]
    if report.get("timing_definitions"):
        parts.append(
            "<p class=muted>"
            + "<br>".join(f"<code>{e(k)}</code>: {e(v)}" for k, v in report["timing_definitions"].items())
            + "</p>"
        )
    if not hists:
        parts.append("<p class=muted>No histograms (matplotlib is not installed, or no metric has values).</p>")
    else:
        parts.append(
            "<h2>Distributions</h2><div class=grid>"
            + "".join(f"<img alt='{e(k)}' src='data:image/png;base64,{v}'>" for k, v in hists.items())
            + "</div>"
        )
    parts.append(
        "<h2>Samples</h2><div style='overflow-x:auto'><table><tr><th>sample</th>"
        + "".join(f"<th><code>{e(k)}</code></th>" for k in keys)
        + "</tr>"
        + "".join(srows)
        + "</table></div>"
    )
    for s in report["samples"]:
        if s["status"] in ("failed", "pending"):
            continue
        segs = "".join(
            f"<tr><td>{g['start_frame']}–{g['end_frame']}</td><td><code>{e(g['garment'])}</code></td>"
            + "".join(
                f"<td class=num>{e(fmt((g.get('scores') or {}).get(k), 2))}</td>"
                for k in ("judge_hgc", "judge_lgc", "judge_ntp")
            )
            + "</tr>"
            for g in s["segments"]
        )
        bnds = "".join(
            f"<li>switch at frame {b_['frame']}: continuity {e(fmt(b_['continuity'], 3))}</li>"
            for b_ in s["switch_boundaries"]
        )
        strip = strips.get(s["id"])
        parts.append(
            f"<div class=sample id='s-{e(s['id'])}'><h3>{e(s['id'])}</h3>"
            + videos.get(s["id"], "")
            + (f"<br><img alt='frames of {e(s['id'])}' src='data:image/jpeg;base64,{strip}'>" if strip else "")
            + "<table><tr><th>segment</th><th>garment</th><th>HGC</th><th>LGC</th><th>NTP</th></tr>"
            + segs
            + "</table>"
            + (f"<ul>{bnds}</ul>" if bnds else "")
            + "</div>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def sample_strips(run_dir: Path, report: dict, bench: Benchmark | None, max_samples: int = 240) -> dict[str, str]:
    """Frame strips of up to `max_samples` samples (reads their videos)."""
    from shared.media.video import read_frames

    out = {}
    for s in report["samples"][:max_samples]:
        video = Path(run_dir) / "samples" / s["id"] / "video.mp4"
        if s["status"] in ("failed", "pending") or not video.is_file():
            continue
        try:
            frames = read_frames(video)[: s["frames"]]
            refs = []
            if bench is not None:
                sample = next(x for x in bench.samples if x.id == s["id"])
                refs = [bench.image(sample.reference)] + [bench.image(g["garment"]) for g in s["segments"]]
            boundaries = [g["start_frame"] for g in s["segments"][1:]]
            out[s["id"]] = frame_strip(frames, refs, boundaries)
        except Exception:  # noqa: BLE001 - a strip is decoration; the numbers are in the tables
            continue
    return out


def sample_videos(run_dir: Path, report: dict, max_samples: int = 48) -> dict[str, str]:
    """Each sample's video (up to `max_samples`, inlined) with a marker at each garment switch."""
    out = {}
    for s in report["samples"][:max_samples]:
        video = Path(run_dir) / "samples" / s["id"] / "video.mp4"
        if s["status"] in ("failed", "pending") or not video.is_file() or not s.get("fps"):
            continue
        switches = [Switch(g["start_frame"], g["garment"]) for g in s["segments"][1:]]
        out[s["id"]] = video_with_switches(f"video-{s['id']}", video, s["frames"], s["fps"], switches)
    return out


def write_reports(
    run_dir: str | Path, bench: Benchmark | None = None, store=None, prefix: str = "eval"
) -> dict[str, Any]:
    """Build and write report.{json,md,html} into the run folder (and the object store when
    given, under {prefix}/runs/<run_id>/). Returns the report dict (with "objects")."""
    run_dir = Path(run_dir)
    report = build_report(run_dir, bench)
    md = to_markdown(report)
    page = to_html(report, sample_strips(run_dir, report, bench), videos=sample_videos(run_dir, report))
    if store is not None:
        base = f"{prefix}/runs/{report['run_id']}"
        report["objects"] = {
            "json": f"{base}/report.json",
            "markdown": f"{base}/report.md",
            "html": f"{base}/report.html",
        }
    write_json_atomic(run_dir / "report.json", report)
    (run_dir / "report.md").write_text(md)
    (run_dir / "report.html").write_text(page)
    if store is not None:
        objs = report["objects"]
        store.put_bytes(objs["json"], json.dumps(report, indent=1, default=str).encode(), "application/json")
        store.put_bytes(objs["markdown"], md.encode(), "text/markdown; charset=utf-8")
        store.put_bytes(objs["html"], page.encode(), "text/html; charset=utf-8")
    return report
