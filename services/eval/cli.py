"""`fashionchameleon eval ...`: HGC-Bench runs with metrics and a VLM judge, reports, comparisons.

    fashionchameleon eval smoke-bench --out bench/           # write the procedural smoke bench
    fashionchameleon eval run --bench smoke --preset tiny --out runs/smoke-1
    fashionchameleon eval run --bench hgc/manifest.jsonl --checkpoint ckpt/ --device cuda \\
        --judge-provider openai --judge-url http://127.0.0.1:8001/v1 --judge-model qwen2.5-vl \\
        --face-onnx weights/curricularface.onnx --out runs/ckpt-0501
    fashionchameleon eval report runs/ckpt-0501              # rebuild report.{json,md,html}
    fashionchameleon eval compare runs/baseline runs/ckpt-0501   # exit 1 on a regression

`run` resumes when pointed at an existing run folder. It prints a summary on stdout (JSON with
--json or when stdout is not a terminal) and exits 1 when a sample failed to generate. `compare` prints a table and exits 1 when a gated
metric regressed (see `services.eval.compare`). Secrets (judge and Studio API keys) are read
from environment variables named by flags, never given on the command line.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from shared.cli import (
    CliError,
    Parser,
    add_engine_arguments,
    add_json_argument,
    emit,
    engine_config,
    fmt_value,
    format_table,
    print_json,
    shipped_checkpoint,
)

SMOKE = "smoke"
TOY = "toy"


def _run_toy_bench(args) -> int:
    """The toy world's held-out bench through the engine (see services/eval/toybench.py)."""
    from services.eval.toybench import Variant, run_bench
    from shared.runtime.pipeline import Engine

    if args.studio is not None:
        raise CliError("--bench toy runs through the engine; give --checkpoint (or nothing: the shipped toy model)")
    frames = args.frames or 93  # 8 chunks
    chunks = max(2, 1 + (frames - 9 + 11) // 12)
    variant = Variant(
        name=args.label or "default",
        refresh=args.refresh,
        withdraw=args.withdraw,
        disentangle=args.disentangle,
        chunks=chunks,
    )
    if args.preset is not None:
        engine = Engine.from_preset(args.preset, engine_config(args, _preset(args.preset)), seed=args.weights_seed)
    else:
        try:
            engine = Engine.from_checkpoint(args.checkpoint, _engine_config_for_checkpoint(args))
        except (OSError, ValueError) as e:
            raise CliError(f"cannot load checkpoint {args.checkpoint}: {e}") from None
    progress = None
    if not args.no_progress:
        from tqdm import tqdm as progress
    report = run_bench(
        args.checkpoint or args.preset,
        Path(args.out),
        samples=args.max_samples or 8,
        chunks=chunks,
        variant=variant,
        progress=progress,
        engine=engine,
        label=args.label,
    )
    run_dir = Path(args.out)
    emit(
        args,
        {
            "run_id": report["run_id"],
            "run_dir": str(run_dir),
            "benchmark": TOY,
            "checkpoint_id": report["checkpoint_id"],
            "samples": report["benchmark"]["samples"],
            "failed": 0,
            "reports": {k: str(run_dir / f"report.{k}") for k in ("json", "md", "html")},
            "metrics": {k: m["value"] for k, m in report["metrics"].items()},
        },
        describe_run,
    )
    return 0


def describe_run(r: dict) -> str:
    """`eval run`'s summary for people: the run, its metrics one per line, where the reports are."""
    lines = [
        f"eval run {r['run_id']} on bench {r['benchmark']}: {r['samples']} samples, {r['failed']} failed",
        format_table([{"metric": k, "value": v} for k, v in r["metrics"].items()], ("metric", "value"))
        if r["metrics"]
        else "  (no metrics)",
    ]
    for name, reasons in r.get("unavailable", {}).items():
        why = "; ".join(f"{reason} ({n})" for reason, n in reasons.items()) if isinstance(reasons, dict) else reasons
        lines.append(f"  {name}: unavailable ({fmt_value(why)})")
    lines.append(f"report: {r['reports']['html']} (also .md, .json)")
    return "\n".join(lines)


def _preset(name: str):
    from shared.models.presets import get_preset

    try:
        return get_preset(name)
    except KeyError as e:
        raise CliError(e.args[0]) from None


def _engine_config_for_checkpoint(args):
    from shared.models.checkpoint import CheckpointError, read_preset

    try:
        preset, _ = read_preset(args.checkpoint)
    except CheckpointError as e:
        raise CliError(f"cannot read checkpoint: {e}") from None
    return engine_config(args, preset)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="benchmark a model: metrics, VLM judge, reports, comparisons",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND", parser_class=Parser)

    smoke = sub.add_parser("smoke-bench", help="write the procedurally generated smoke bench")
    smoke.add_argument("--out", required=True, metavar="DIR", help="folder for manifest.jsonl and images/")
    add_json_argument(smoke)
    smoke.set_defaults(run=run_smoke)

    run = sub.add_parser("run", help="generate and score every sample of a benchmark")
    run.add_argument(
        "--bench",
        required=True,
        metavar="MANIFEST",
        help="manifest.jsonl path, object:<key> (needs --store), 'smoke', or 'toy' (the toy world's held-out "
        "bench, scored with its exact metrics)",
    )
    run.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (its name is the run id; resumes)")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder (default: the shipped toy model)")
    source.add_argument("--preset", metavar="NAME", help="random weights of a preset (e.g. tiny)")
    source.add_argument("--studio", metavar="HOST:PORT", help="a running Studio (public gRPC API)")
    run.add_argument("--weights-seed", type=int, default=0, help="seed of random weights with --preset")
    run.add_argument(
        "--studio-api-key-env",
        default="FASHIONCHAMELEON_API_KEY",
        metavar="VAR",
        help="environment variable holding the Studio API key",
    )
    run.add_argument("--application", default="fashionchameleon", help="Ray Serve app name sent to Studio")
    add_engine_arguments(run)
    run.add_argument("--config", metavar="FILE", help="EvalConfig JSON (flags override it)")
    run.add_argument("--label", default="", help="label shown in the report")
    run.add_argument("--concurrency", type=int, help="samples in flight (default 1; timings contend above 1)")
    run.add_argument("--max-samples", type=int, help="only the first N samples")
    run.add_argument("--frames", type=int, help="pixel frames of samples without their own length (default 81)")
    run.add_argument("--seed", type=int, help="session seed of samples without their own (default 0)")
    run.add_argument("--metrics", metavar="GROUPS", help="comma-separated metric groups (default: all)")
    run.add_argument("--metrics-device", help="torch device of MUSIQ / Q-Align / GME (default cpu)")
    run.add_argument("--face-onnx", metavar="FILE", help="ArcFace / CurricularFace ONNX (default: dlib ResNet)")
    run.add_argument("--face-onnx-name", help="name shown for the ONNX face model, e.g. curricularface")
    run.add_argument(
        "--dlib-models", metavar="DIR", help="folder of dlib .dat models (default: face_recognition_models)"
    )
    run.add_argument("--musiq-weights", metavar="FILE", help="pyiqa MUSIQ checkpoint (local file)")
    run.add_argument("--qalign-model", metavar="DIR", help="q-future/one-align folder (local)")
    run.add_argument("--gme-model", metavar="DIR", help="gme-Qwen2-VL folder (local)")
    run.add_argument("--judge-provider", choices=["openai", "gemini"], help="VLM judge API shape")
    run.add_argument("--judge-url", metavar="URL", help="judge base URL (openai: .../v1, gemini: .../v1beta)")
    run.add_argument("--judge-model", metavar="NAME", help="judge model name")
    run.add_argument(
        "--judge-api-key-env",
        default="FASHIONCHAMELEON_JUDGE_API_KEY",
        metavar="VAR",
        help="environment variable holding the judge API key (unset: no key sent)",
    )
    run.add_argument("--judge-repeats", type=int, help="judgements averaged per sample (default 3)")
    run.add_argument("--judge-frames", type=int, help="video frames sent per judgement (default 8)")
    run.add_argument("--store", metavar="URL", help="object store for object: references and the reports")
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    for step in ("refresh", "withdraw", "disentangle"):
        run.add_argument(
            f"--no-{step}", dest=step, action="store_false", help=f"skip the switch's {step} step (ablation)"
        )
    add_json_argument(run)
    run.set_defaults(run=run_eval)

    rep = sub.add_parser("report", help="(re)build report.{json,md,html} of a run folder")
    rep.add_argument("run_dir", metavar="RUN_DIR")
    rep.add_argument("--bench", metavar="MANIFEST", help="the run's manifest (adds input thumbnails); 'smoke' allowed")
    rep.add_argument("--store", metavar="URL", help="also store the reports in this object store")
    rep.add_argument("--prefix", default="eval", help="object-store prefix (default eval)")
    add_json_argument(rep)
    rep.set_defaults(run=run_report)

    cmp_ = sub.add_parser("compare", help="side-by-side metrics of two runs; exit 1 on a regression")
    cmp_.add_argument("a", metavar="A", help="baseline: run folder, report.json or object:<key>")
    cmp_.add_argument("b", metavar="B", help="candidate: run folder, report.json or object:<key>")
    cmp_.add_argument(
        "--tolerance",
        action="append",
        default=[],
        metavar="METRIC=LIMIT",
        help="allowed worsening, absolute (0.05) or relative (5%%); 'none' removes a gate; repeatable",
    )
    cmp_.add_argument("--config", metavar="FILE", help="EvalConfig JSON whose `tolerances` replace the defaults")
    cmp_.add_argument("--store", metavar="URL", help="object store for object: references")
    cmp_.add_argument("--json", action="store_true", help="print the comparison as JSON instead of a table")
    cmp_.set_defaults(run=run_compare)


# ---- helpers -------------------------------------------------------------------------------
def _store(url: str | None):
    if url is None:
        return None
    from shared.storage import StorageConfig, open_store

    try:
        store = open_store(StorageConfig.from_url(url))
        store.ensure_bucket()
        return store
    except ValueError as e:
        raise CliError(f"--store: {e}") from None


def _eval_config(args) -> Any:
    from pydantic import SecretStr, ValidationError

    from services.eval.config import ALL_GROUPS, EvalConfig

    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        try:
            data = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CliError(f"--config {args.config}: {e}") from None
    runner, metrics, judge = data.setdefault("runner", {}), data.setdefault("metrics", {}), data.setdefault("judge", {})
    for flag, section, field in (
        ("concurrency", runner, "concurrency"),
        ("frames", runner, "default_frames"),
        ("seed", runner, "seed"),
        ("metrics_device", metrics, "device"),
        ("face_onnx", metrics, "face_onnx"),
        ("face_onnx_name", metrics, "face_onnx_name"),
        ("dlib_models", metrics, "dlib_models_dir"),
        ("musiq_weights", metrics, "musiq_weights"),
        ("qalign_model", metrics, "qalign_model"),
        ("gme_model", metrics, "gme_model"),
        ("judge_provider", judge, "provider"),
        ("judge_url", judge, "base_url"),
        ("judge_model", judge, "model"),
        ("judge_repeats", judge, "repeats"),
        ("judge_frames", judge, "frames"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            section[field] = value
    for step in ("refresh", "withdraw", "disentangle"):
        if not getattr(args, step, True):
            runner[step] = False
    if args.metrics:
        groups = tuple(g.strip() for g in args.metrics.split(",") if g.strip())
        unknown = sorted(set(groups) - set(ALL_GROUPS))
        if unknown:
            raise CliError(f"--metrics: unknown groups {unknown}; known: {', '.join(ALL_GROUPS)}")
        metrics["groups"] = groups
    for path_flag in ("face_onnx", "musiq_weights"):
        value = getattr(args, path_flag)
        if value is not None and not Path(value).is_file():
            raise CliError(f"--{path_flag.replace('_', '-')} {value}: no such file")
    for dir_flag in ("qalign_model", "gme_model", "dlib_models"):
        value = getattr(args, dir_flag)
        if value is not None and not Path(value).is_dir():
            raise CliError(f"--{dir_flag.replace('_', '-')} {value}: no such folder")
    try:
        cfg = EvalConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise CliError(f"eval config: {'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None
    key = os.environ.get(args.judge_api_key_env) if args.judge_api_key_env else None
    if key:
        cfg = cfg.model_copy(update={"judge": cfg.judge.model_copy(update={"api_key": SecretStr(key)})})
    if cfg.judge.provider is not None and not cfg.judge.configured:
        raise CliError("--judge-provider needs --judge-url and --judge-model")
    return cfg


def _bench(spec: str, out_dir: Path, store):
    from services.eval.bench import BenchError, load_benchmark
    from services.eval.smoke import SMOKE_NAME, write_smoke_bench
    from shared.storage import ObjectNotFound, StorageError

    try:
        if spec == SMOKE:
            return load_benchmark(write_smoke_bench(out_dir / "smoke-bench"), store, name=SMOKE_NAME)
        return load_benchmark(spec, store)
    except ObjectNotFound as e:
        raise CliError(f"--bench: {e}") from None
    except (BenchError, StorageError) as e:
        raise CliError(f"--bench: {e}") from None


def _backend(args, cfg):
    from services.eval.backends import EngineBackend, StudioBackend

    if args.studio:
        from services.studio.client import StudioClient

        key = os.environ.get(args.studio_api_key_env)
        if not key:
            raise CliError(f"--studio needs the API key in ${args.studio_api_key_env}")
        client = StudioClient(args.studio, key, application=args.application or None)
        sw = {
            "refresh_garment_kv": cfg.runner.refresh,
            "withdraw_history_kv": cfg.runner.withdraw,
            "disentangle_reference_kv": cfg.runner.disentangle,
        }
        return StudioBackend(client, args.studio, switch_options=sw)
    from shared.models.checkpoint import CheckpointError, build_random, read_preset
    from shared.models.presets import get_preset
    from shared.runtime.pipeline import DTYPES, Engine
    from shared.runtime.session import SwitchOptions

    try:
        preset = get_preset(args.preset) if args.preset else read_preset(args.checkpoint)[0]
    except KeyError as e:
        raise CliError(e.args[0]) from None
    except (CheckpointError, ValueError) as e:
        raise CliError(f"cannot read checkpoint: {e}") from None
    config = engine_config(args, preset)
    try:
        engine = (
            Engine(build_random(preset, args.weights_seed, DTYPES[config.dtype]), config)
            if args.preset
            else Engine.from_checkpoint(args.checkpoint, config)
        )
    except (CheckpointError, OSError) as e:
        raise CliError(f"cannot load checkpoint {args.checkpoint}: {e}") from None
    options = SwitchOptions(
        refresh=cfg.runner.refresh, withdraw=cfg.runner.withdraw, disentangle=cfg.runner.disentangle
    )
    return EngineBackend(engine, options, fps=cfg.runner.fps)


# ---- commands ------------------------------------------------------------------------------
def run_smoke(args) -> int:
    from services.eval.smoke import write_smoke_bench

    manifest = write_smoke_bench(args.out)
    emit(args, {"manifest": str(manifest)}, lambda r: f"wrote the smoke bench: {r['manifest']}")
    return 0


def run_eval(args) -> int:
    from services.eval.bench import BenchError
    from services.eval.report import write_reports
    from services.eval.runner import RunMismatch, Runner
    from services.eval.scoring import Scorer

    if args.max_samples is not None and args.max_samples < 1:
        raise CliError("--max-samples must be >= 1")
    if args.checkpoint is None and args.preset is None and args.studio is None:
        args.checkpoint = shipped_checkpoint()
    if args.bench == TOY:
        return _run_toy_bench(args)
    cfg = _eval_config(args)
    run_dir = Path(args.out).expanduser().absolute()
    store = _store(args.store)
    bench = _bench(args.bench, run_dir, store)
    backend = _backend(args, cfg)
    scorer = Scorer(cfg.metrics, cfg.judge)
    runner = Runner(bench, backend, scorer, cfg, run_dir, label=args.label, show_progress=not args.no_progress)
    try:
        progress = runner.run(max_samples=args.max_samples)
    except (RunMismatch, BenchError) as e:
        raise CliError(str(e)) from None
    report = write_reports(run_dir, bench, store, cfg.report_prefix)
    headline = {k: m["value"] for k, m in report["metrics"].items()}
    emit(
        args,
        {
            "run_id": report["run_id"],
            "run_dir": str(run_dir),
            "benchmark": bench.name,
            "samples": progress.total,
            "failed": progress.failed,
            "reports": {k: str(run_dir / f"report.{k}") for k in ("json", "md", "html")},
            "objects": report.get("objects", {}),
            "metrics": headline,
            "unavailable": {k: m["reasons"] for k, m in report["metrics"].items() if m["status"] == "unavailable"},
        },
        describe_run,
    )
    return 1 if progress.failed else 0


def run_report(args) -> int:
    from services.eval.report import write_reports

    run_dir = Path(args.run_dir)
    if not (run_dir / "run.json").is_file():
        raise CliError(f"{run_dir} is not a run folder (no run.json)")
    store = _store(args.store)
    bench = _bench(args.bench, run_dir, store) if args.bench else None
    report = write_reports(run_dir, bench, store, args.prefix)
    emit(
        args,
        {
            "run_id": report["run_id"],
            "reports": {k: str(run_dir / f"report.{k}") for k in ("json", "md", "html")},
            "objects": report.get("objects", {}),
        },
        lambda r: (
            f"wrote the reports of run {r['run_id']}: {', '.join(r['reports'].values())}"
            + "".join(f"\n  stored as {key}" for key in r["objects"].values())
        ),
    )
    return 0


def _load_report(ref: str, store) -> dict:
    if ref.startswith("object:"):
        if store is None:
            raise CliError(f"{ref}: object references need --store")
        from shared.storage import ObjectNotFound

        try:
            data = store.get_bytes(ref[len("object:") :])
        except ObjectNotFound as e:
            raise CliError(str(e)) from None
    else:
        path = Path(ref)
        if path.is_dir():
            path = path / "report.json"
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CliError(f"{ref}: {e.strerror or e} (give a run folder or a report.json)") from None
    try:
        report = json.loads(data)
    except json.JSONDecodeError as e:
        raise CliError(f"{ref}: not a JSON report: {e}") from None
    if not isinstance(report, dict) or "metrics" not in report:
        raise CliError(f"{ref}: not an eval report (no 'metrics')")
    return report


def parse_tolerances(specs: list[str], base: dict) -> dict:
    from services.eval.config import Tolerance

    out = dict(base)
    for spec in specs:
        key, sep, limit = spec.partition("=")
        key, limit = key.strip(), limit.strip()
        if not sep or not key or not limit:
            raise CliError(f"--tolerance {spec!r}: expected METRIC=LIMIT, e.g. judge_hgc=0.05 or backbone_fps=5%")
        if limit.lower() == "none":
            out.pop(key, None)
            continue
        try:
            out[key] = Tolerance(rel=float(limit[:-1]) / 100) if limit.endswith("%") else Tolerance(abs=float(limit))
        except ValueError:
            raise CliError(f"--tolerance {spec!r}: {limit!r} is not a number") from None
    return out


def run_compare(args) -> int:
    from services.eval.compare import compare_reports, format_table
    from services.eval.config import DEFAULT_TOLERANCES, EvalConfig

    store = _store(args.store)
    base = dict(DEFAULT_TOLERANCES)
    if args.config:
        try:
            base = dict(EvalConfig.model_validate_json(Path(args.config).read_text()).tolerances)
        except (OSError, ValueError) as e:
            raise CliError(f"--config {args.config}: {e}") from None
    tolerances = parse_tolerances(args.tolerance, base)
    a, b = _load_report(args.a, store), _load_report(args.b, store)
    result = compare_reports(a, b, tolerances)
    if args.json:
        print_json(
            {
                "a": a.get("run_id"),
                "b": b.get("run_id"),
                "warnings": result.warnings,
                "regressions": [r.key for r in result.regressions],
                "rows": [
                    {"key": r.key, "a": r.a, "b": r.b, "delta": r.delta, "verdict": r.verdict} for r in result.rows
                ],
            }
        )
    else:
        print(format_table(result, f"A:{a.get('run_id', 'A')}", f"B:{b.get('run_id', 'B')}"))
    return 1 if result.regressions else 0
