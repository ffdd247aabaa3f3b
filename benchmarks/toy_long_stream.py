"""Issue 13 on the toy model: how far a stream attends, and what a prompt change re-caches.

    python benchmarks/toy_long_stream.py [--checkpoint checkpoints/toy] [--study readings|prompt|all]
                                         [--chunks 40] [--seeds 0 1] [--json]

`readings`: one long stream (default 40 chunks) per reading of the paper's "KV cache size M":
  trained-span (cond + sink + window + chunk = the trained length, the default) and m-is-cache
  (M = sink + window = the trained length, attending further: `attend_beyond_trained`). Scored by
  the toy world's exact metrics (`shared.toyworld.metrics.score_clip`, `drift`), whole stream
  and last 10 chunks.
`prompt`: a stream opened on one motion prompt that switches to another mid-stream, under three
  settings: text only (the old behaviour), + cond KV re-cache (the default), + window re-cache.
  Reports, per setting, how many frames after the switch the motion classifier first reads the
  new motion on a 12-frame window (and then keeps reading it for the next window), and whether
  the switch frame is a jump (`jump_at`).
Prints markdown tables, and with --json one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from shared.media.images import prepare_reference  # noqa: E402
from shared.models.checkpoint import load_checkpoint  # noqa: E402
from shared.runtime.config import EngineConfig  # noqa: E402
from shared.runtime.pipeline import Engine  # noqa: E402
from shared.runtime.session import PromptOptions  # noqa: E402
from shared.toyworld import metrics as tm  # noqa: E402

EXAMPLES = ROOT / "examples"
WAVE = "The person waves with the right hand steadily."
LEFT = "The person walks to the left."
RIGHT = "The person walks to the right."
PROMPT_SETTINGS = {
    "text-only": PromptOptions(recache_cond=False, recache_window=False),
    "recache-cond": PromptOptions(recache_cond=True, recache_window=False),
    "recache-cond+window": PromptOptions(recache_cond=True, recache_window=True),
}
SWITCHES = {"left->wave": (LEFT, WAVE), "left->right": (LEFT, RIGHT)}


def _finite(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, float, np.floating, np.integer)):
        v = float(v)
        return None if math.isnan(v) or math.isinf(v) else round(v, 4)
    return v


def _images():
    person = Image.open(EXAMPLES / "person.png").convert("RGB")
    red = Image.open(EXAMPLES / "garment-red.png").convert("RGB")
    return person, red


def _stream(engine: Engine, prompt: str, chunks: int, seed: int, switch: tuple[int, str, PromptOptions] | None = None):
    person, garment = _images()
    session = engine.session()
    frames, gen_s = [], 0.0
    switch_frame = None
    session.open(person, garment, prompt, seed=seed)
    try:
        for c in range(chunks):
            if switch is not None and c == switch[0]:
                t0 = time.perf_counter()
                session.update_prompt(switch[1], switch[2])
                gen_s += time.perf_counter() - t0
                switch_frame = sum(len(f) for f in frames)
            r = session.next_chunk()
            gen_s += r.generate_seconds
            frames.append(r.frames.numpy())
    finally:
        session.close()
    return np.concatenate(frames), switch_frame, gen_s


def _engine(checkpoint: str, reading: str) -> Engine:
    comps = load_checkpoint(checkpoint)
    st = comps.preset.streaming.for_reading(reading)
    overrides = {"max_cache_frames": st.max_cache_frames, "attend_beyond_trained": st.attend_beyond_trained}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the m-is-cache opt-in warns; it is what is measured here
        return Engine(comps, EngineConfig(attention_backend="math", streaming_overrides=overrides))


def reading_scores(video: np.ndarray, reference: np.ndarray, garment: np.ndarray, caption: str) -> dict:
    raw = tm.score_clip(video, reference, [garment], [], caption)
    keep = (
        "found_rate",
        "motion_detected",
        "motion_direction_accuracy",
        "smoothness_mean_px",
        "identity_match_rate",
        "bottoms_match_rate",
        "seg0_garment_delta_e",
        "seg0_garment_match_rate",
    )
    out = {k: _finite(raw.get(k)) for k in keep}
    tail = video[-120:]  # the last 10 chunks
    raw_tail = tm.score_clip(tail, reference, [garment], [], caption)
    out.update({f"last10_{k}": _finite(raw_tail.get(k)) for k in keep})
    d = tm.drift(video, reference, garment, window=48)
    out.update({f"drift_{k}": _finite(v) for k, v in d.items() if not isinstance(v, (list, dict))})
    return out


def study_readings(checkpoint: str, chunks: int, seeds: list[int], prompt: str = WAVE) -> dict:
    person, garment = _images()
    results = {}
    for reading in ("trained-span", "m-is-cache"):
        engine = _engine(checkpoint, reading)
        st = engine.preset.streaming
        st_h, st_w = st.height, st.width
        ref = np.asarray(prepare_reference(person, st_h, st_w))
        rows = []
        for seed in seeds:
            video, _, gen_s = _stream(engine, prompt, chunks, seed)
            row = reading_scores(video, ref, np.asarray(garment), prompt)
            row["generate_fps"] = round(len(video) / gen_s, 2)
            rows.append(row)
        results[reading] = {
            "attended_frames": st.attended_frames,
            "trained_frames": st.trained_frames,
            "max_rope_position": st.max_rope_frame_position,
            "chunks": chunks,
            "seeds": seeds,
            **_mean_rows(rows),
        }
    return results


def _mean_rows(rows: list[dict]) -> dict:
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        if all(isinstance(v, bool) for v in vals):
            out[k] = sum(vals) / len(vals)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[k] = round(float(np.mean(vals)), 4)
        elif any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            ok = [v for v in vals if isinstance(v, (int, float))]
            out[k] = round(float(np.mean(ok)), 4)
        else:
            out[k] = vals if len(vals) > 1 else vals[0]
    return out


def follow_latency(video: np.ndarray, switch_frame: int, target: str, window: int = 12, step: int = 3) -> int | None:
    """Frames from the switch until a `window`-frame span starting there is classified as the
    target motion and the next span (+window) is too; None if never."""
    for start in range(switch_frame, len(video) - 2 * window + 1, step):
        if (
            tm.classify_motion(video[start : start + window]) == target
            and tm.classify_motion(video[start + window : start + 2 * window]) == target
        ):
            return start - switch_frame
    return None


def study_prompt(checkpoint: str, seeds: list[int], before: int = 4, after: int = 8) -> dict:
    engine = _engine(checkpoint, "trained-span")
    results: dict[str, dict] = {}
    for name, (old, new) in SWITCHES.items():
        target = tm.motion_kind_from_caption(new)
        for setting, options in PROMPT_SETTINGS.items():
            rows = []
            for seed in seeds:
                video, sw, _ = _stream(engine, old, before + after, seed, (before, new, options))
                lat = follow_latency(video, sw, target)
                jump = tm.jump_at(video, sw)
                after_clip = video[sw + 12 :]
                rows.append(
                    {
                        "follow_latency_frames": lat,
                        "followed": lat is not None,
                        "after_motion_detected": tm.classify_motion(after_clip),
                        "after_direction_correct": bool(tm.motion_direction_correct(after_clip, new)),
                        "before_motion_detected": tm.classify_motion(video[12:sw]),
                        "switch_jump": bool(jump["is_jump"]),
                        "switch_traj_ratio": _finite(jump["traj_ratio"]),
                        "switch_mask_ratio": _finite(jump["mask_ratio"]),
                    }
                )
            summary = _mean_rows(rows)
            summary["follow_latency_frames_per_seed"] = [r["follow_latency_frames"] for r in rows]
            results[f"{name} / {setting}"] = {"switch_chunk": before, "target": target, **summary}
    return results


def table(title: str, results: dict[str, dict], keys: tuple[str, ...]) -> str:
    head = "| " + title + " | " + " | ".join(keys) + " |"
    sep = "|---" * (len(keys) + 1) + "|"
    rows = []
    for name, s in results.items():
        cells = []
        for k in keys:
            v = s.get(k)
            cells.append("—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "toy"))
    p.add_argument("--study", choices=("readings", "prompt", "all"), default="all")
    p.add_argument("--chunks", type=int, default=40, help="chunks per long stream (readings)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    out: dict = {"checkpoint": args.checkpoint}
    if args.study in ("readings", "all"):
        out["readings"] = study_readings(args.checkpoint, args.chunks, args.seeds)
        print(
            table(
                "reading",
                out["readings"],
                (
                    "attended_frames",
                    "max_rope_position",
                    "found_rate",
                    "motion_detected",
                    "identity_match_rate",
                    "seg0_garment_match_rate",
                    "seg0_garment_delta_e",
                    "last10_seg0_garment_match_rate",
                    "last10_identity_match_rate",
                    "smoothness_mean_px",
                    "drift_garment_delta_e_change",
                    "generate_fps",
                ),
            )
        )
    if args.study in ("prompt", "all"):
        out["prompt"] = study_prompt(args.checkpoint, args.seeds)
        print(
            table(
                "switch / setting",
                out["prompt"],
                (
                    "follow_latency_frames",
                    "followed",
                    "after_motion_detected",
                    "after_direction_correct",
                    "switch_jump",
                    "switch_traj_ratio",
                    "switch_mask_ratio",
                ),
            )
        )
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
