"""The run report: what was kept, what was dropped where and why, score distributions.

Written under {output_prefix}report/:
    report.json        counts per stage (clips in, dropped per "stage:kind"), kept, notes
    drops.jsonl        every dropped clip with its full reason
    hist_{score}.png   histogram of each score, kept vs dropped, with the threshold
    sample_sheet.png   kept triplets: reference | garment | first / middle / last frame
"""

from __future__ import annotations

import io
import json
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from .records import STAGES, ClipRecord

if TYPE_CHECKING:
    from .stages import Context

THUMB = 128  # sample-sheet cell height, pixels


def summarize(records: list[ClipRecord], videos: int) -> dict:
    order = {s: i for i, s in enumerate(STAGES)}
    stages = {s: {"in": 0, "dropped": Counter()} for s in STAGES}
    notes: Counter = Counter()
    for r in records:
        last = order[r.stage] if r.status == "dropped" else len(STAGES) - 1
        for s in STAGES[: last + 1]:
            stages[s]["in"] += 1
        if r.status == "dropped":
            stages[r.stage]["dropped"][r.reason_kind] += 1
        for n in r.notes:
            notes[n] += 1
    return {
        "videos": videos,
        "clips": len(records),
        "kept": sum(r.status == "kept" for r in records),
        "pending": sum(r.status == "pending" for r in records),
        "stages": {s: {"in": v["in"], "dropped": dict(sorted(v["dropped"].items()))} for s, v in stages.items()},
        "dropped_by_reason": dict(sorted(Counter(r.reason_kind for r in records if r.status == "dropped").items())),
        "notes": dict(notes),
        "seconds_kept": round(sum(r.seconds for r in records if r.status == "kept"), 3),
    }


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def histograms(records: list[ClipRecord], thresholds: dict[str, float]) -> dict[str, bytes]:
    """PNG histogram per score name found in the records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k for r in records for k in r.scores})
    out = {}
    for name in names:
        kept = [r.scores[name] for r in records if name in r.scores and r.status == "kept"]
        other = [r.scores[name] for r in records if name in r.scores and r.status != "kept"]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        data = [d for d in (kept, other) if d]
        labels = [lbl for lbl, d in (("kept", kept), ("dropped", other)) if d]
        ax.hist(data, bins=20, stacked=True, label=labels)
        if name in thresholds:
            ax.axvline(thresholds[name], color="k", linestyle="--", label="threshold")
        ax.set_title(name)
        ax.set_xlabel(name)
        ax.set_ylabel("clips")
        ax.legend()
        fig.tight_layout()
        out[name] = _png(fig)
        plt.close(fig)
    return out


def _thumb(img: Image.Image) -> Image.Image:
    w = max(1, round(img.width * THUMB / img.height))
    return img.convert("RGB").resize((w, THUMB), Image.BILINEAR)


def sample_sheet(ctx: Context, kept: list[ClipRecord], rows: int) -> bytes | None:
    """PNG grid of up to `rows` kept triplets with their short dynamic caption."""
    from shared.media.video import read_frames

    if not kept:
        return None
    lines = []
    for rec in kept[:rows]:
        frames = read_frames(ctx.store.get_bytes(ctx.layout.key(rec.artifacts["video"])))
        cells = [ctx.get_image(rec.artifacts["reference"]), ctx.get_image(rec.artifacts["garment"])]
        cells += [Image.fromarray(frames[i]) for i in (0, len(frames) // 2, len(frames) - 1)]
        thumbs = [_thumb(c) for c in cells]
        line = Image.new("RGB", (sum(t.width for t in thumbs) + 4 * len(thumbs), THUMB + 18), "white")
        x = 0
        for t in thumbs:
            line.paste(t, (x, 18))
            x += t.width + 4
        caption = rec.captions.get("en_short", [rec.captions.get("dynamic", "")])[0]
        ImageDraw.Draw(line).text((2, 3), f"{rec.clip_id}: {caption}"[:140], fill="black")
        lines.append(line)
    sheet = Image.new("RGB", (max(ln.width for ln in lines), sum(ln.height for ln in lines)), "white")
    y = 0
    for ln in lines:
        sheet.paste(ln, (0, y))
        y += ln.height
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def write_report(ctx: Context, records: list[ClipRecord], videos: int) -> dict:
    cfg, lay, store = ctx.cfg, ctx.layout, ctx.store
    report = summarize(records, videos)
    thresholds = {
        "motion": cfg.motion.min_magnitude,
        "quality": cfg.quality.min_quality,
        "aesthetic": cfg.quality.min_aesthetic,
        "person_area": cfg.person.min_main_area,
    }
    plots = histograms(records, thresholds)
    for name, data in plots.items():
        store.put_bytes(lay.key(f"report/hist_{name}.png"), data, content_type="image/png")
    report["plots"] = [f"report/hist_{n}.png" for n in plots]
    sheet = sample_sheet(ctx, [r for r in records if r.status == "kept"], cfg.sample_sheet_rows)
    if sheet is not None:
        store.put_bytes(lay.key("report/sample_sheet.png"), sheet, content_type="image/png")
        report["sample_sheet"] = "report/sample_sheet.png"
    report["score_summary"] = {
        name: {"min": float(np.min(v)), "median": float(np.median(v)), "max": float(np.max(v)), "n": len(v)}
        for name in sorted({k for r in records for k in r.scores})
        for v in [[r.scores[name] for r in records if name in r.scores]]
    }
    drops = "".join(
        json.dumps({"clip_id": r.clip_id, "video": r.video_key, "reason": r.reason, "scores": r.scores}) + "\n"
        for r in records
        if r.status == "dropped"
    )
    store.put_bytes(lay.key("report/drops.jsonl"), drops.encode(), content_type="application/x-ndjson")
    store.put_bytes(lay.key("report/report.json"), (json.dumps(report, indent=2) + "\n").encode(),
                    content_type="application/json")  # fmt: skip
    return report
