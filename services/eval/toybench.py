"""The toy world's held-out bench: `fashionchameleon eval run --bench toy`.

Each sample is a held-out (test-split) person and two held-out tops: the session opens with the
person's reference image (wearing a third top), garment 1 and the scene's dynamic caption, and
switches to garment 2 at a chunk boundary. The video runs through the normal engine
(`shared.runtime.pipeline`), 4 denoising steps, and is scored from its frames alone with the toy
world's metrics (`shared.toyworld.metrics`). A run folder holds `results.jsonl` (one row per
sample), `clips/*.mp4`, `report.json` (the format `eval compare` gates), `report.md` and a
self-contained `report.html` with each video and a frame strip around each switch.

Variants (`Variant`): switch steps on or off (the paper's Fig. 7 ablation), a longer run for drift.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from shared.toyworld import metrics as tm
from shared.toyworld.render import HOLDOUT_COLOURS, Motion, render_garment, sample_top
from shared.toyworld.samples import make_sample

BENCH_NAME = "toy"

# What report.json says about each summary metric: (title, higher is better).
METRICS: dict[str, tuple[str, bool | None]] = {
    # relative: is the top closer (pattern Delta-E) to the scheduled garment than to the other one?
    "garment_accuracy_before": ("top closer to garment 1 than to garment 2, before the switch", True),
    "garment_accuracy_after": ("top closer to garment 2 than to garment 1, from one chunk after the switch", True),
    "relative_switch_latency_frames": (
        "frames from the switch until the top is closer to garment 2 (3 in a row)",
        False,
    ),
    # absolute: the metric's strict match (pattern Delta-E <= 18 per cell, calibrated on rendered frames)
    "garment_match_before": ("top matches garment 1 before the switch (fraction of frames)", True),
    "garment_match_after": ("top matches garment 2 after the switch (fraction of frames)", True),
    "garment_delta_e_before": ("top pattern distance to garment 1 (Delta-E per cell), before", False),
    "garment_delta_e_after": ("top pattern distance to garment 2 (Delta-E per cell), after", False),
    "identity_match_rate": ("skin and hair match the reference (fraction of frames)", True),
    "identity_skin_delta_e": ("skin colour distance to the reference (Delta-E)", False),
    "bottoms_match_rate": ("bottoms match the reference (fraction of frames)", True),
    "bottoms_delta_e": ("bottoms colour distance to the reference (Delta-E)", False),
    "person_found": ("frames with a person located", True),
    "motion_direction_accuracy": ("motion matches the caption (fraction of samples)", True),
    "smoothness_px": ("trajectory roughness (mean |2nd difference|, px)", False),
    "switch_jump_rate": ("a jump in the trajectory or silhouette at the switch (fraction)", False),
    "switch_latency_frames": ("frames from the switch until garment 2 shows", False),
    "switch_in_first_chunk": ("garment 2 shows within the first chunk after the switch (fraction)", True),
    "end_to_end_fps": ("end-to-end FPS (generate + decode, this machine)", True),
    # long runs only (variant chunks >= LONG_RUN_CHUNKS): the last 2 s against the first 2 s after the switch
    "drift_garment_delta_e": ("long run: garment pattern distance, last 2 s minus first 2 s", False),
    "drift_garment_match_end": ("long run: top matches garment 2 in the last 2 s (fraction)", True),
    "drift_identity_match_end": ("long run: identity matches in the last 2 s (fraction)", True),
}
LONG_RUN_CHUNKS = 40

# score_clip key -> report key
_FROM_CLIP = {
    "seg0_garment_match_rate": "garment_match_before",
    "seg1_garment_match_rate": "garment_match_after",
    "seg0_garment_delta_e": "garment_delta_e_before",
    "seg1_garment_delta_e": "garment_delta_e_after",
    "identity_match_rate": "identity_match_rate",
    "identity_skin_delta_e": "identity_skin_delta_e",
    "bottoms_match_rate": "bottoms_match_rate",
    "bottoms_delta_e": "bottoms_delta_e",
    "found_rate": "person_found",
    "motion_direction_accuracy": "motion_direction_accuracy",
    "smoothness_mean_px": "smoothness_px",
    "switch0_latency_frames": "switch_latency_frames",
}


@dataclass(frozen=True)
class Variant:
    """How the bench runs: switch steps, chunks, where the switch lands."""

    name: str = "default"
    refresh: bool = True
    withdraw: bool = True
    disentangle: bool = True
    chunks: int = 8
    switch_chunk: int | None = None  # None: chunks // 2
    streaming_overrides: dict = field(default_factory=dict)


@dataclass
class BenchSample:
    id: str
    reference: Image.Image
    garments: tuple[Image.Image, Image.Image]
    prompt: str
    motion: str
    seed: int


def bench_samples(count: int, height: int, width: int) -> list[BenchSample]:
    """`count` held-out samples: test-split person, garment 1 = the scene's top, garment 2 another held-out top."""
    out = []
    for i in range(count):
        s = make_sample(i, "test", 1, height, width)
        rng = np.random.default_rng([7, i])
        while True:
            top2 = sample_top(rng, "test")
            lab = tm.srgb_to_lab(np.array([top2.colour, s.scene.top.colour], dtype=np.uint8))
            if float(tm.delta_e(lab[0], lab[1])) > 40:
                break
        out.append(
            BenchSample(
                s.id,
                Image.fromarray(s.reference),
                (Image.fromarray(s.garment), Image.fromarray(render_garment(top2))),
                s.dynamic_caption,
                s.scene.motion.kind,
                seed=i,
            )
        )
    return out


def _frames_strip(frames: np.ndarray, start: int, stop: int, step: int = 2) -> str:
    """A PNG (base64) of frames[start:stop:step] side by side."""
    sel = frames[max(start, 0) : stop : step]
    img = Image.fromarray(np.concatenate(list(sel), axis=1))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def run_sample(engine, sample: BenchSample, variant: Variant) -> tuple[np.ndarray, dict]:
    """Generate one sample through the engine; (frames uint8 [T, H, W, 3], timing + switch info)."""
    from shared.runtime.session import SwitchOptions

    opts = SwitchOptions(refresh=variant.refresh, withdraw=variant.withdraw, disentangle=variant.disentangle)
    k = variant.switch_chunk if variant.switch_chunk is not None else variant.chunks // 2
    session = engine.session()
    frames, gen_s, dec_s = [], 0.0, 0.0
    switch_frame = None
    try:
        session.open(sample.reference, sample.garments[0], sample.prompt, seed=sample.seed)
        for c in range(variant.chunks):
            if c == k:
                session.switch_garment(sample.garments[1], opts)
                switch_frame = sum(len(f) for f in frames)
            r = session.next_chunk()
            gen_s += r.generate_seconds
            dec_s += r.decode_seconds
            frames.append(r.frames.numpy())
    finally:
        session.close()
    video = np.concatenate(frames)
    return video, {
        "switch_frame": switch_frame,
        "switch_chunk": k,
        "generate_seconds": gen_s,
        "decode_seconds": dec_s,
        "end_to_end_fps": len(video) / max(gen_s + dec_s, 1e-9),
    }


def score_sample(video: np.ndarray, sample: BenchSample, info: dict, chunk_frames: int = 12) -> dict:
    ref = np.asarray(sample.reference)
    g1, g2 = (np.asarray(g) for g in sample.garments)
    sw = info["switch_frame"]
    raw = tm.score_clip(video, ref, [g1, g2], [sw], Motion(sample.motion).kind)
    d1 = np.array([tm.garment_fidelity(f, g1)["pattern_delta_e"] for f in video])
    d2 = np.array([tm.garment_fidelity(f, g2)["pattern_delta_e"] for f in video])
    closer2 = d2 < d1  # NaN (no person) compares False
    rel_latency = next((t - sw for t in range(sw, len(video) - 2) if closer2[t : t + 3].all()), None)
    s = {dst: _finite(raw.get(src)) for src, dst in _FROM_CLIP.items()}
    lat = s["switch_latency_frames"]
    s["switch_in_first_chunk"] = float(lat is not None and lat < chunk_frames)
    s["switch_jump_rate"] = float(bool(raw.get("switch0_jump")))
    s["garment_accuracy_before"] = float((d1[:sw] < d2[:sw]).mean())
    s["garment_accuracy_after"] = float(closer2[sw + chunk_frames :].mean()) if len(video) > sw + chunk_frames else None
    s["relative_switch_latency_frames"] = None if rel_latency is None else float(rel_latency)
    s["motion_detected"] = raw.get("motion_detected")
    s["garment_delta_e_per_frame"] = {"garment_1": [_finite(x) for x in d1], "garment_2": [_finite(x) for x in d2]}
    if len(video) >= 9 + 12 * (LONG_RUN_CHUNKS - 1):
        d = tm.drift(video[sw:], ref, g2, window=48)
        s["drift_garment_delta_e"] = _finite(d["garment_delta_e_change"])
        s["drift_garment_match_end"] = _finite(d["garment_match_rate_end"])
        s["drift_identity_match_end"] = _finite(d["identity_match_rate_end"])
    return s


def _finite(v):
    if v is None or isinstance(v, str):
        return v
    v = float(v)
    return v if np.isfinite(v) else None


def run_bench(
    checkpoint: str | Path,
    out_dir: str | Path,
    samples: int = 8,
    chunks: int = 8,
    variant: Variant | None = None,
    progress=None,
    engine=None,
    label: str = "",
) -> dict:
    """Run the held-out bench with the checkpoint; writes the run folder; returns report.json's content."""
    from shared.media.video import write_mp4
    from shared.runtime.config import EngineConfig
    from shared.runtime.pipeline import Engine

    variant = variant or Variant(chunks=chunks)
    out = Path(out_dir)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    if engine is None:
        engine = Engine.from_checkpoint(checkpoint, EngineConfig(streaming_overrides=variant.streaming_overrides))
    st = engine.preset.streaming
    items = bench_samples(samples, st.height, st.width)
    rows, strips = [], {}
    it = progress(items, desc=f"bench {variant.name}") if progress else items
    start = time.perf_counter()
    for sample in it:
        video, info = run_sample(engine, sample, variant)
        write_mp4(video, out / "clips" / f"{sample.id}.mp4", fps=st.fps)
        scores = score_sample(video, sample, info)
        rows.append(
            {"id": sample.id, "prompt": sample.prompt, "motion": sample.motion, "frames": len(video), **info, **scores}
        )
        sw = info["switch_frame"]
        strips[sample.id] = _frames_strip(video, sw - 6, sw + 14)
    (out / "results.jsonl").write_text("".join(json.dumps(r, default=float) + "\n" for r in rows))
    summary = summarize(rows)
    report = {
        "run_id": out.name,
        "label": label or variant.name,
        "checkpoint_id": engine.checkpoint_id,
        "variant": asdict(variant),
        "benchmark": {
            "name": BENCH_NAME,
            "samples": len(rows),
            "failed": 0,
            "sha256": hashlib.sha256(json.dumps([samples, chunks, HOLDOUT_COLOURS]).encode()).hexdigest(),
        },
        "seconds": round(time.perf_counter() - start, 2),
        "summary": summary,
        "metrics": {
            k: {"value": summary.get(k), "title": t, "higher_is_better": hib} for k, (t, hib) in METRICS.items()
        },
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (out / "report.md").write_text(
        format_table(summary, title=f"toy bench: {report['label']} ({engine.checkpoint_id})") + "\n"
    )
    (out / "report.html").write_text(_html(report, rows, strips, out, fps=st.fps))
    return report


def summarize(rows: list[dict]) -> dict:
    out = {}
    for key in METRICS:
        vals = [float(r[key]) for r in rows if r.get(key) is not None]
        out[key] = float(np.mean(vals)) if vals else None
    lat = [r["switch_latency_frames"] for r in rows]
    out["switch_never_shown"] = sum(v is None for v in lat)
    return out


def format_table(summary: dict, title: str = "toy bench") -> str:
    lines = [f"## {title}", "", "| metric | value |", "|---|---|"]
    for key, (t, hib) in METRICS.items():
        v = summary.get(key)
        arrow = "↑" if hib else "↓" if hib is False else ""
        lines.append(f"| {t} {arrow} | {'—' if v is None else f'{v:.3f}'} |")
    return "\n".join(lines)


def garment_plot(row: dict) -> str | None:
    """A base64 PNG: per frame, the top's pattern distance (Delta-E) to garment 1 and to garment 2,
    the switch as a vertical line; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = row.get("garment_delta_e_per_frame") or {}
    fig, ax = plt.subplots(figsize=(5.2, 2.4))
    for name, colour in (("garment_1", "#4c72b0"), ("garment_2", "#55a868")):
        ys = [np.nan if v is None else v for v in curves.get(name, [])]
        ax.plot(range(len(ys)), ys, color=colour, linewidth=1.4, label=name.replace("_", " "))
    ax.axvline(row["switch_frame"], color="#c44e52", linewidth=1.2, linestyle="--", label="switch")
    ax.set_xlabel("frame", fontsize=9)
    ax.set_ylabel("top pattern \u0394E", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False, ncol=3)  # above the plot
    ax.grid(alpha=0.25)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _html(report: dict, rows: list[dict], strips: dict[str, str], out: Path, fps: float = 24.0) -> str:
    from .html_video import CSS, SCRIPT, Switch, video_with_switches

    parts = [
        f"<!doctype html><meta charset=utf-8><title>toy bench {html.escape(report['run_id'])}</title>",
        "<style>body{font:14px sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}img.strip{image-rendering:pixelated;height:200px}"
        f".muted{{color:#777}}.row{{display:flex;gap:16px;align-items:flex-start;flex-wrap:wrap}}{CSS}</style>",
        SCRIPT,
        f"<h1>Toy bench: {html.escape(report['label'])}</h1><p>checkpoint <code>{html.escape(report['checkpoint_id'])}"
        f"</code>, {report['benchmark']['samples']} held-out samples</p><table><tr><th>metric</th><th>value</th></tr>",
    ]
    for m in report["metrics"].values():
        v = m["value"]
        parts.append(f"<tr><td>{html.escape(m['title'])}</td><td>{'—' if v is None else f'{v:.3f}'}</td></tr>")
    parts.append("</table>")
    for r in rows:
        clip = out / "clips" / f"{r['id']}.mp4"
        sw = r["switch_frame"]
        switches = [] if sw is None else [Switch(sw, "garment 2")]
        plot = garment_plot(r)
        parts.append(
            f"<h2>{html.escape(r['id'])}: {html.escape(r['prompt'])}</h2>"
            f"<p>switch at chunk {r['switch_chunk']} (frame {sw}); top closer to garment 2 after "
            f"{r.get('relative_switch_latency_frames')} frames, a strict match after {r.get('switch_latency_frames')} "
            f"frames; motion detected {html.escape(str(r.get('motion_detected')))}, direction correct: "
            f"{r.get('motion_direction_accuracy')}</p><div class=row>"
            + video_with_switches(f"clip-{r['id']}", clip, r.get("frames") or 0, fps, switches)
            + (
                f"<img alt='garment distance of {html.escape(r['id'])}' src='data:image/png;base64,{plot}'>"
                if plot
                else ""
            )
            + f"</div><p>frames {sw - 6} .. {sw + 13} (every 2nd; the switch is the 4th):</p>"
            f"<img class=strip src='data:image/png;base64,{strips[r['id']]}'>"
        )
    return "\n".join(parts) + "\n"
