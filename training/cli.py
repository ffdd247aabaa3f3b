"""`fashionchameleon train`: preprocess data, run the three training stages, export checkpoints.

    fashionchameleon train preprocess --manifest data.jsonl --out data/ [--recipe tiny]
    fashionchameleon train teacher --recipe tiny --data data/ --run-dir runs/teacher
    fashionchameleon train export --from runs/teacher --out checkpoints/teacher
    fashionchameleon train teacher-forcing --recipe tiny --data data/ --set model.checkpoint=checkpoints/teacher ...
    fashionchameleon train dmd --recipe tiny --data data/ --set generator.checkpoint=... --set score.checkpoint=...
    fashionchameleon train recipe --recipe wan2.2-ti2v-5b --gpus 8     (the recipe and its memory plan)

Several GPUs: `torchrun --nproc-per-node 8 -m services.cli train teacher --recipe wan2.2-ti2v-5b ...`
(torchrun's RANK / WORLD_SIZE / LOCAL_RANK are read here, at the edge). A run folder that
already holds a checkpoint resumes from it. Prints a summary on stdout: readable on a terminal,
one JSON object with --json or when stdout is not a terminal. Progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from shared.cli import (
    CliError,
    add_json_argument,
    check_output_folder,
    emit,
    fmt_seconds,
    fmt_value,
    format_fields,
    format_table,
)

STAGE_COMMANDS = {"teacher": "teacher", "teacher-forcing": "teacher_forcing", "dmd": "dmd"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="training: preprocess, teacher, teacher-forcing, dmd, export, toy, fast-decoder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="train_command", required=True, metavar="STEP", parser_class=type(p))

    for command, stage in STAGE_COMMANDS.items():
        s = sub.add_parser(command, help=f"train the {command} stage")
        _recipe_arguments(s)
        s.add_argument("--data", metavar="DIR_OR_URL", help="preprocessed dataset (sets data.root)")
        s.add_argument("--run-dir", metavar="DIR", help="run folder (default: runs/<recipe>/<stage>)")
        s.add_argument("--max-steps", type=int, metavar="N", help="stop after step N (default: the recipe's)")
        s.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="a progress bar on stderr (default: the recipe's run.progress; on for full recipes)",
        )
        add_json_argument(s)
        s.set_defaults(run=run_stage, stage=stage)

    e = sub.add_parser("export", help="write a servable checkpoint folder from a training save")
    e.add_argument(
        "--from", dest="source", required=True, metavar="DIR", help="run folder (latest save) or step folder"
    )
    e.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to create")
    e.add_argument("--force", action="store_true", help="write into a non-empty folder")
    add_json_argument(e)
    e.set_defaults(run=run_export)

    pre = sub.add_parser("preprocess", help="encode raw samples into latent shards")
    src = pre.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", metavar="JSONL", help="raw samples (see training/README.md)")
    src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic samples (smoke tests)")
    _recipe_arguments(pre)
    pre.add_argument("--out", required=True, metavar="DIR", help="dataset folder to create")
    pre.add_argument("--max-pixel-frames", type=int, default=81, help="clip length cap (default: 81)")
    pre.add_argument("--samples-per-shard", type=int, default=64)
    pre.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    pre.add_argument("--upload", metavar="URL", help="also upload to an object store (s3://bucket/prefix?endpoint=...)")
    pre.add_argument("--force", action="store_true", help="write into a non-empty folder")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_json_argument(pre)
    pre.set_defaults(run=run_preprocess)

    t = sub.add_parser(
        "toy",
        help="the toy try-on world end to end: VAE, data, teacher, teacher forcing, GR-DMD",
        description="Reproduce checkpoints/toy from scratch on a CPU (about 1.5 h on 2 cores). Each "
        "step resumes from its folder under --out; a rerun skips finished steps. Prints the "
        "metric table of the held-out bench at the end.",
    )
    t.add_argument("--out", required=True, metavar="DIR", help="run folder (created; resumed when it exists)")
    t.add_argument("--quick", action="store_true", help="a few steps of every stage (a smoke run of minutes)")
    t.add_argument("--no-eval", action="store_true", help="skip the held-out bench at the end")
    add_json_argument(t)
    t.set_defaults(run=run_toy)

    f = sub.add_parser(
        "fast-decoder",
        help="distil a checkpoint's VAE decoder into a small causal decoder",
        description="Train <checkpoint>/fast_decoder from the checkpoint's own VAE decoder (teacher) on "
        "rendered toy-world clips, then print its PSNR against the teacher and both "
        "decoders' speed. Resumes from <checkpoint>/fast_decoder-state.pt. Serve it with "
        "model.engine.decoder = fast (`--decoder fast` on generate / up).",
    )
    f.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint folder (written into)")
    f.add_argument("--steps", type=int, default=2000, help="training steps (default: 2000, ~40 min on 2 cores)")
    f.add_argument("--clips", type=int, default=96, help="training clips (each also perturbed once; default 96)")
    f.add_argument(
        "--dit-sessions",
        type=int,
        default=32,
        metavar="N",
        help="also distil on N latent streams the checkpoint's DiT generates (default 32; 0: clips only)",
    )
    f.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    f.add_argument("--finetune", action="store_true", help="start from the checkpoint's existing fast_decoder/")
    add_json_argument(f)
    f.set_defaults(run=run_fast_decoder)

    r = sub.add_parser("recipe", help="print a recipe (resolved) and its per-GPU memory plan")
    _recipe_arguments(r)
    r.add_argument("--gpus", type=int, default=8, help="GPUs for the memory plan (default: 8)")
    add_json_argument(r)
    r.set_defaults(run=run_recipe)


def _recipe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="tiny", metavar="NAME_OR_JSON", help="recipe name, JSON file or JSON object")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the stage (e.g. run.max_steps=10); repeatable",
    )


def _load_recipe(args: argparse.Namespace, stage: str | None):
    from training.config import load_recipe, parse_override

    try:
        overrides = {}
        for item in args.set:
            key, value = parse_override(item)
            overrides[f"{stage}.{key}" if stage else key] = value
        if stage and getattr(args, "data", None):
            overrides[f"{stage}.data.root"] = args.data
        if stage and getattr(args, "progress", None) is not None:
            overrides[f"{stage}.run.progress"] = args.progress
        return load_recipe(args.recipe, overrides)
    except (KeyError, ValueError) as e:
        raise CliError(f"recipe: {e.args[0] if isinstance(e, KeyError) else e}") from None


def _dist_from_env() -> tuple[int, int, int]:
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))


def _credentials() -> tuple[str, str] | None:
    access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    return (access, secret) if access and secret else None


def run_stage(args: argparse.Namespace) -> int:
    from training.parallel import init_distributed, shutdown
    from training.trainer import make_run

    recipe = _load_recipe(args, args.stage)
    stage = recipe.stage(args.stage)
    if stage.data.root is None:
        raise CliError(f"no dataset: pass --data or set {args.stage}.data.root in the recipe")
    run_dir = Path(args.run_dir or f"runs/{recipe.name}/{args.stage}")
    rank, world, local = _dist_from_env()
    info = init_distributed(stage.run.device, rank, world, local)
    start = time.perf_counter()
    try:
        run = make_run(recipe, args.stage, run_dir, info, _credentials())
        first = run.step
        history = run.run(args.max_steps)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    finally:
        shutdown()
    if info.is_main:
        emit(
            args,
            {
                "stage": args.stage,
                "recipe": recipe.name,
                "run_dir": str(run_dir),
                "resumed_from": first,
                "step": run.step,
                "world_size": world,
                "last": history[-1] if history else None,
                "seconds": round(time.perf_counter() - start, 3),
            },
            describe_stage,
        )
    return 0


def describe_stage(r: dict) -> str:
    steps = (
        f"steps {r['resumed_from']}..{r['step']}"
        if r["step"] > r["resumed_from"]
        else f"nothing to do at step {r['step']}"
    )
    lines = [
        f"{r['stage'].replace('_', ' ')} stage of recipe {r['recipe']}: {steps} "
        f"on {r['world_size']} rank(s) in {fmt_seconds(r['seconds'])}; saved in {r['run_dir']}"
    ]
    if r["last"]:
        lines.append("  last step  " + ", ".join(f"{k} {fmt_value(v)}" for k, v in r["last"].items() if k != "step"))
    return "\n".join(lines)


def run_export(args: argparse.Namespace) -> int:
    from training.export import export

    out = check_output_folder(args.out, args.force)
    try:
        summary = export(args.source, out)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    emit(
        args,
        summary,
        lambda r: (
            f"exported {r['stage'].replace('_', ' ')} step {r['step']} (recipe {r['recipe']}) as checkpoint "
            f"{r['checkpoint_id']}: {r['path']}"
        ),
    )
    return 0


def run_preprocess(args: argparse.Namespace) -> int:
    from training.data.preprocess import preprocess, read_manifest, upload_dataset
    from training.data.synthetic import synthetic_samples
    from training.models import load_components

    recipe = _load_recipe(args, None)
    source = recipe.teacher.model
    out = check_output_folder(args.out, args.force)
    components = load_components(source, frozenset({"vae", "text_encoder"}))
    st = components.preset.streaming
    if args.manifest is not None:
        if not Path(args.manifest).is_file():
            raise CliError(f"manifest {args.manifest} does not exist")
        samples = read_manifest(args.manifest)
    else:
        samples = synthetic_samples(args.synthetic, st.height, st.width, pixel_frames=args.max_pixel_frames)
    if not args.no_progress:
        from tqdm import tqdm

        total = args.synthetic if args.manifest is None else _manifest_rows(args.manifest)
        samples = tqdm(samples, total=total, desc="preprocess", unit="sample", dynamic_ncols=True)
    start = time.perf_counter()
    try:
        index = preprocess(
            samples,
            components,
            out,
            max_pixel_frames=args.max_pixel_frames,
            samples_per_shard=args.samples_per_shard,
            dtype=args.dtype,
        )
    except ValueError as e:
        raise CliError(str(e)) from None
    uploaded = 0
    if args.upload:
        from shared.storage.config import StorageConfig
        from shared.storage.factory import open_store

        creds = _credentials() or (None, None)
        store = open_store(StorageConfig.from_url(args.upload, access_key=creds[0], secret_key=creds[1]))
        uploaded = upload_dataset(out, store, "")
    emit(
        args,
        {
            "path": str(out),
            "samples": index.num_samples,
            "shards": len(index.shards),
            "uploaded_objects": uploaded,
            "seconds": round(time.perf_counter() - start, 3),
        },
        lambda r: (
            f"wrote {r['samples']} samples in {r['shards']} shard(s) to {r['path']} in "
            f"{fmt_seconds(r['seconds'])}"
            + (f"; uploaded {r['uploaded_objects']} objects" if r["uploaded_objects"] else "")
        ),
    )
    return 0


def _manifest_rows(path: str) -> int:
    """Samples in a manifest (its non-blank lines), the preprocess bar's total."""
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def run_toy(args: argparse.Namespace) -> int:
    import sys

    from tqdm import tqdm

    from training.toy import ToyPlan
    from training.toy import run_toy as run

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is not a folder")
    start = time.perf_counter()
    plan = ToyPlan.quick() if args.quick else ToyPlan.full()
    summary = run(out, plan, progress=tqdm, log=lambda m: print(m, file=sys.stderr, flush=True))
    if not args.no_eval:
        from services.eval.toybench import format_table, run_bench

        bench = run_bench(
            summary["checkpoint"],
            out / "bench",
            samples=2 if args.quick else 8,
            chunks=4 if args.quick else 8,
            progress=tqdm,
        )
        summary["bench"] = bench["summary"]
        print(format_table(bench["summary"]), file=sys.stderr)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    emit(args, summary, describe_toy)
    return 0


def describe_toy(r: dict) -> str:
    lines = [f"toy model trained in {fmt_seconds(r['seconds'])}: {r['checkpoint']}"]
    rows = []
    for stage in ("teacher", "teacher_forcing", "dmd"):
        if stage in r:
            first_last = r[stage].get("loss_first_last") or (None, None)
            rows.append({"stage": stage.replace("_", " "), "checkpoint": r[stage]["export"].get("checkpoint_id"),
                         "loss_first": first_last[0], "loss_last": first_last[1]})  # fmt: skip
    if "vae" in r:
        lines.append(f"  VAE: held-out PSNR {fmt_value(r['vae'].get('psnr_db'))} dB")
    if rows:
        lines.append(format_table(rows, ("stage", "checkpoint", "loss_first", "loss_last")))
    if "bench" in r:
        lines.append("  (the bench table is above, on stderr)")
    return "\n".join(lines)


def run_fast_decoder(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from training.fast_decoder import FastDecoderTrainConfig, train_fast_decoder

    root = Path(args.checkpoint)
    if not (root / "vae" / "config.json").is_file():
        raise CliError(f"--checkpoint {root} has no vae/ folder (a checkpoint folder is needed)")
    if args.steps < 1 or args.clips < 1 or args.dit_sessions < 0 or args.lr <= 0:
        raise CliError("--steps and --clips must be at least 1, --dit-sessions at least 0, --lr positive")
    if args.finetune and not (root / "fast_decoder" / "model.safetensors").is_file():
        raise CliError(f"--finetune: {root} has no fast_decoder/ yet (train one first, without --finetune)")
    start = time.perf_counter()
    with tqdm(total=args.steps, desc="fast decoder", unit="step") as bar:

        def progress(step: int, total: int, loss: float) -> None:
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.refresh()

        cfg = FastDecoderTrainConfig(
            steps=args.steps,
            clips=args.clips,
            dit_sessions=args.dit_sessions,
            lr=args.lr,
            min_lr=min(1e-4, args.lr / 10),
            finetune=args.finetune,
        )
        report = train_fast_decoder(root, cfg, progress=progress)
    emit(
        args,
        {"fast_decoder": str(root / "fast_decoder"), **report, "seconds": round(time.perf_counter() - start, 1)},
        lambda r: (
            f"wrote {r['fast_decoder']} in {fmt_seconds(r['seconds'])}\n"
            + format_fields({k: v for k, v in r.items() if k not in ("fast_decoder", "seconds")})
        ),
    )
    return 0


def run_recipe(args: argparse.Namespace) -> int:
    from training.memory import memory_plan
    from training.models import source_preset

    recipe = _load_recipe(args, None)
    preset = source_preset(recipe.teacher.model.model_copy(update={"checkpoint": None}))
    plans = {}
    for stage in ("teacher", "teacher_forcing", "dmd"):
        frames = recipe.stage(stage).data.latent_frames
        plans[stage] = memory_plan(preset, stage, args.gpus, frames, recipe.stage(stage).data.batch_size).model_dump()
    emit(args, {"recipe": recipe.model_dump(mode="json"), "memory_plan": plans}, describe_recipe)
    return 0


def describe_recipe(r: dict) -> str:
    rows = list(r["memory_plan"].values())
    name = r["recipe"]["name"]
    return (
        f"recipe {name}: memory per GPU on {rows[0]['world_size']} GPU(s), GiB (`--json` prints the resolved recipe)\n"
        + format_table(
            rows,
            ("stage", "parameters", "tokens", "model_states_gib", "activations_gib", "kv_cache_gib", "total_gib"),
        )
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m training.cli STEP ...`: the `train` command on its own (e.g. under torchrun)."""
    import sys

    from shared.cli import USAGE_ERROR, Parser, quiet_libraries

    parser = Parser(prog="fashionchameleon")
    register(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    try:
        args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
        quiet_libraries()
        return args.run(args)
    except CliError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
