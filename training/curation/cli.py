"""`fashionchameleon curate ...`: raw videos -> curated (reference, garment, video, caption) triplets.

    fashionchameleon curate run --input /data/raw --out /data/curated \\
        --vlm-url http://vlm:8000/v1 --vlm-model qwen2.5-vl-72b \\
        --edit-url http://qwen-edit:8000/v1 --catalog-prefix garments/
    fashionchameleon curate run --input 's3://raw/videos/?endpoint=minio:9000' \\
        --out 's3://datasets/curated-v3/?endpoint=minio:9000' --config curate.json --ray-address auto
    fashionchameleon curate export --out /data/curated --to /data/curated-plain
    fashionchameleon train preprocess --manifest /data/curated-plain/manifest.jsonl ...

`--input` is a plain folder (videos anywhere below it) or an object-store URL; `--out` is an
object-store URL or path (see `shared.storage.StorageConfig.from_url`). `--config` is a
CurationConfig JSON (training/curation/config.py; may omit input/output); flags override it.
Re-running the same command resumes (finished work is read back from the output's _state/).
`run` prints the report's counts (a summary on a terminal; one JSON object with --json or when
stdout is not a terminal); `--export DIR` also writes the plain folder the training
preprocessing reads. Secrets (VLM / edit API keys, S3 credentials) are
read from environment variables named by flags, never given on the command line.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from shared.cli import CliError, Parser, add_json_argument, emit, fmt_seconds, fmt_value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "curate",
        help="curate training triplets from raw videos (Ray Data pipeline, paper App. A)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="curate_command", required=True, metavar="CURATE_COMMAND", parser_class=Parser)

    run = sub.add_parser("run", help="run (or resume) the four curation stages")
    run.add_argument("--input", required=True, metavar="DIR_OR_URL", help="folder of raw videos or object-store URL")
    run.add_argument("--input-prefix", default=None, help="key prefix of the videos in an object store")
    _add_output(run)
    run.add_argument("--config", metavar="FILE", help="CurationConfig JSON (flags override it)")
    run.add_argument("--vlm-url", help="OpenAI-compatible base URL (POST {url}/chat/completions)")
    run.add_argument("--vlm-model", help="VLM model name")
    run.add_argument("--vlm-api-key-env", metavar="VAR", help="environment variable holding the VLM API key")
    run.add_argument("--vlm-rps", type=float, help="VLM requests per second per worker")
    run.add_argument("--edit-url", help="image-edit base URL for both try-off and try-on")
    run.add_argument("--try-off-url", help="image-edit base URL for try-off (overrides --edit-url)")
    run.add_argument("--try-on-url", help="image-edit base URL for try-on (overrides --edit-url)")
    run.add_argument("--edit-model", help="image-edit model name")
    run.add_argument("--edit-api-key-env", metavar="VAR", help="environment variable holding the edit API key")
    run.add_argument("--person-backend", help="none | ultralytics | package.module:factory")
    run.add_argument("--person-weights", metavar="FILE", help="local YOLO-seg weights (ultralytics backend)")
    run.add_argument(
        "--catalog-prefix", help="garment database prefix in the output store ({prefix}{upper|lower|full}/)"
    )
    run.add_argument("--catalog-folder", metavar="DIR", help="garment database as a plain folder (upper/ lower/ full/)")
    run.add_argument("--ray-address", help="Ray cluster address (default: start a local instance)")
    run.add_argument("--export", metavar="DIR", help="also write the plain folder for `train preprocess`")
    run.add_argument("--fail-fast", action="store_true", help="raise on the first unexpected stage error")
    run.add_argument("--dry-run", action="store_true", help="print the resolved config and the video count only")
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_json_argument(run)
    run.set_defaults(run=run_run)

    export = sub.add_parser("export", help="copy a finished run's manifest and samples into a plain folder")
    _add_output(export)
    export.add_argument("--to", required=True, metavar="DIR")
    add_json_argument(export)
    export.set_defaults(run=run_export)


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR_OR_URL", help="output object store (URL or path)")
    p.add_argument("--out-prefix", default=None, help="key prefix of the run in the output store")
    p.add_argument("--s3-access-key-env", default="FC_S3_ACCESS_KEY", metavar="VAR")
    p.add_argument("--s3-secret-key-env", default="FC_S3_SECRET_KEY", metavar="VAR")


def _store(url: str, args: argparse.Namespace) -> dict:
    from shared.storage.config import StorageConfig

    try:
        cfg = StorageConfig.from_url(url, access_key=os.environ.get(args.s3_access_key_env),
                                     secret_key=os.environ.get(args.s3_secret_key_env))  # fmt: skip
    except ValueError as e:
        raise CliError(str(e)) from None
    data = cfg.model_dump(mode="json")
    if cfg.s3 is not None:  # model_dump masks secrets; keep the real values for validation
        data["s3"]["access_key"] = cfg.s3.access_key.get_secret_value() if cfg.s3.access_key else None
        data["s3"]["secret_key"] = cfg.s3.secret_key.get_secret_value() if cfg.s3.secret_key else None
    return data


def _secret(var: str | None) -> str | None:
    if var is None:
        return None
    if var not in os.environ:
        raise CliError(f"environment variable {var} is not set")
    return os.environ[var]


def build_config(args: argparse.Namespace):
    """CurationConfig from --config and the flags (flags win)."""
    from pydantic import ValidationError

    from training.curation.config import CurationConfig

    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        try:
            data = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CliError(f"--config {args.config}: {e}") from None

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            data.setdefault(section, {})[key] = value

    data["output"] = _store(args.out, args)
    if args.out_prefix is not None:
        data["output_prefix"] = args.out_prefix
    if hasattr(args, "input"):
        if Path(args.input).is_dir():
            data["input_folder"], data["input"] = args.input, None
        else:
            data["input"], data["input_folder"] = _store(args.input, args), None
        if args.input_prefix is not None:
            data["input_prefix"] = args.input_prefix
        put("vlm", "base_url", args.vlm_url)
        put("vlm", "model", args.vlm_model)
        put("vlm", "api_key", _secret(args.vlm_api_key_env))
        put("vlm", "requests_per_s", args.vlm_rps)
        for section, url in (
            ("try_off", args.try_off_url or args.edit_url),
            ("try_on", args.try_on_url or args.edit_url),
        ):
            put(section, "base_url", url)
            put(section, "model", args.edit_model)
            put(section, "api_key", _secret(args.edit_api_key_env))
        put("person", "backend", args.person_backend)
        put("person", "weights", args.person_weights)
        put("reference", "prefix", args.catalog_prefix)
        put("reference", "folder", args.catalog_folder)
    elif "input" not in data and "input_folder" not in data:
        data["input_folder"] = "."  # export needs only the output side
    try:
        return CurationConfig.model_validate(data)
    except ValidationError as e:
        raise CliError(f"bad curation config: {e}") from None


def run_run(args: argparse.Namespace) -> int:
    from training.curation.pipeline import check_ready, export_folder, list_videos, run

    cfg = build_config(args)
    if args.dry_run:
        emit(
            args,
            {"config": json.loads(cfg.model_dump_json()), "videos": len(list_videos(cfg))},
            lambda r: f"dry run: {r['videos']} videos would be curated (`--json` prints the resolved config)",
        )
        return 0
    try:
        check_ready(cfg)
    except ValueError as e:
        raise CliError(str(e)) from None
    result = run(cfg, ray_address=args.ray_address, fail_fast=args.fail_fast, progress=not args.no_progress)
    summary = {k: result.report[k] for k in ("videos", "clips", "kept", "dropped_by_reason", "notes")}
    summary["seconds"] = round(result.seconds, 1)
    summary["manifest"] = result.manifest_key
    if args.export:
        summary["export"] = str(export_folder(cfg, args.export))
    emit(args, summary, describe_run)
    return 0


def describe_run(r: dict) -> str:
    dropped = r["dropped_by_reason"]
    lines = [
        f"curated {r['videos']} videos into {r['clips']} clips in {fmt_seconds(r['seconds'])}: {r['kept']} kept, "
        f"{sum(dropped.values())} dropped",
        *(f"  dropped for {reason}: {n}" for reason, n in sorted(dropped.items(), key=lambda x: -x[1])),
        f"  manifest  {r['manifest']}",
    ]
    if "export" in r:
        lines.append(f"  exported  {r['export']}")
    lines += [f"  note      {name}: {fmt_value(n)}" for name, n in r["notes"].items()]
    return "\n".join(lines)


def run_export(args: argparse.Namespace) -> int:
    from shared.storage.base import ObjectNotFound
    from training.curation.pipeline import export_folder

    cfg = build_config(args)
    try:
        manifest = export_folder(cfg, args.to)
    except ObjectNotFound as e:
        raise CliError(f"no finished run there ({e})") from None
    emit(
        args,
        {"manifest": str(manifest), "samples": sum(1 for _ in manifest.open())},
        lambda r: f"exported {r['samples']} samples: {r['manifest']}",
    )
    return 0
