"""The paper's ablations in miniature on the toy world (section 5.3, Fig. 7), with the held-out bench.

    python benchmarks/toy_ablations.py --run runs/toy [--samples 8] [--long-samples 2] [--json]

`--run` is a `fashionchameleon train toy` folder (it holds ckpt-teacher, ckpt-teacher-forcing,
ckpt-student, and ckpt-student-plain once `--plain-dmd` trained it). Prints one markdown table per
study (switch steps off one at a time; teacher vs teacher forcing vs distilled student; plain DMD vs
GR-DMD on 100-chunk runs) and, with --json, one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.eval.toybench import METRICS, Variant, run_bench  # noqa: E402

SHOW = (
    "garment_accuracy_before",
    "garment_accuracy_after",
    "relative_switch_latency_frames",
    "garment_match_before",
    "garment_match_after",
    "switch_latency_frames",
    "switch_in_first_chunk",
    "identity_match_rate",
    "bottoms_match_rate",
    "motion_direction_accuracy",
    "switch_jump_rate",
    "smoothness_px",
    "end_to_end_fps",
)
LONG_SHOW = (
    "garment_accuracy_after",
    "garment_match_after",
    "drift_garment_delta_e",
    "drift_garment_match_end",
    "drift_identity_match_end",
    "identity_match_rate",
    "person_found",
    "smoothness_px",
)


def table(title: str, results: dict[str, dict], keys: tuple[str, ...]) -> str:
    head = "| " + title + " | " + " | ".join(keys) + " |"
    sep = "|---" * (len(keys) + 1) + "|"
    rows = []
    for name, summary in results.items():
        cells = ["—" if summary.get(k) is None else f"{summary[k]:.2f}" for k in keys]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a `fashionchameleon train toy` folder")
    p.add_argument("--out", help="where the bench run folders go (default RUN/ablations)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--long-samples", type=int, default=2)
    p.add_argument("--long-chunks", type=int, default=100)
    p.add_argument("--plain-dmd", action="store_true", help="train the plain-DMD student first if missing")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    run = Path(args.run)
    out = Path(args.out or run / "ablations")
    student = run / "checkpoint"
    if args.plain_dmd and not (run / "ckpt-student-plain" / "training.json").exists():
        from training.toy import run_plain_dmd

        run_plain_dmd(run)

    def bench(name: str, ckpt: Path, variant: Variant, samples: int) -> dict:
        return run_bench(ckpt, out / name, samples=samples, chunks=variant.chunks, variant=variant)["summary"]

    switch = {
        "all steps": bench("switch-all", student, Variant("all", chunks=args.chunks), args.samples),
        "no refresh": bench(
            "switch-no-refresh", student, Variant("no-refresh", refresh=False, chunks=args.chunks), args.samples
        ),
        "no withdraw": bench(
            "switch-no-withdraw", student, Variant("no-withdraw", withdraw=False, chunks=args.chunks), args.samples
        ),
        "no disentangle": bench(
            "switch-no-disentangle",
            student,
            Variant("no-disentangle", disentangle=False, chunks=args.chunks),
            args.samples,
        ),
    }
    stages = {
        "teacher (stage 1)": bench(
            "stage-teacher", run / "ckpt-teacher", Variant("teacher", chunks=args.chunks), args.samples
        ),
        "teacher forcing (stage 2)": bench(
            "stage-tf", run / "ckpt-teacher-forcing", Variant("tf", chunks=args.chunks), args.samples
        ),
        "GR-DMD student (stage 3)": switch["all steps"],
    }
    long_variant = Variant("long", chunks=args.long_chunks, switch_chunk=2)
    long = {"GR-DMD": bench("long-grdmd", student, long_variant, args.long_samples)}
    if (run / "ckpt-student-plain" / "training.json").exists():
        long["plain DMD"] = bench("long-plain", run / "ckpt-student-plain", long_variant, args.long_samples)
    long["teacher forcing (no DMD)"] = bench("long-tf", run / "ckpt-teacher-forcing", long_variant, args.long_samples)
    print(table("switch steps (student)", switch, SHOW))
    print()
    print(table("stage", stages, SHOW))
    print()
    print(table(f"{args.long_chunks}-chunk runs", long, LONG_SHOW))
    print("\n" + "; ".join(f"{k}: {METRICS[k][0]}" for k in dict.fromkeys(SHOW + LONG_SHOW)))
    if args.json:
        print(json.dumps({"switch": switch, "stages": stages, "long": long}, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
