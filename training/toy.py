"""The toy try-on world, trained end to end by our own pipeline: `fashionchameleon train toy --out DIR`.

Steps (each resumable from its folder under DIR; a rerun skips finished steps):

    DIR/stage0-vae/       stage 0: the toy preset's AutoencoderKLWan on rendered pixels (training/vae.py)
    DIR/init/             checkpoint folder: random DiT + trained VAE + the (random, frozen) text encoder
    DIR/data/             rendered training-split samples encoded into latent shards (training/data)
    DIR/teacher/          stage 1 run  -> DIR/ckpt-teacher/
    DIR/teacher_forcing/  stage 2 run  -> DIR/ckpt-teacher-forcing/
    DIR/dmd/              stage 3 run  -> DIR/ckpt-student/    (GR-DMD, reward: `toy_reward`)
    DIR/checkpoint/       the student, 16-bit weights: what checkpoints/toy ships

`quick=True` shortens every step (minutes, for tests); the metric table is printed by the caller
(`services.eval.toybench`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shared.models.checkpoint import Components, build_random, load_checkpoint, save_checkpoint
from shared.models.presets import Preset, get_preset
from shared.models.vae import VideoVAE
from shared.toyworld.samples import make_sample

from .config import load_recipe
from .data.preprocess import RawSample, preprocess
from .vae import VAETrainConfig, heldout_psnr, train_vae

PRESET = "toy"
CLIP_PIXEL_FRAMES = 45  # 12 latent frames


@dataclass(frozen=True)
class ToyPlan:
    """Sizes of each step; `full()` is what produced checkpoints/toy, `quick()` a smoke run."""

    vae: VAETrainConfig
    samples: int
    teacher_steps: int
    tf_steps: int
    dmd_steps: int
    pixel_frames: int = CLIP_PIXEL_FRAMES

    @classmethod
    def full(cls) -> ToyPlan:
        return cls(VAETrainConfig(), samples=1000, teacher_steps=1300, tf_steps=450, dmd_steps=150)

    @classmethod
    def quick(cls) -> ToyPlan:
        return cls(
            VAETrainConfig(steps=40, long_from=30, checkpoint_every=20, stats_samples=8),
            samples=8,
            teacher_steps=30,
            tf_steps=10,
            dmd_steps=5,
            pixel_frames=45,
        )


def raw_samples(
    count: int, split: str, preset: Preset, pixel_frames: int = CLIP_PIXEL_FRAMES, start: int = 0
) -> Iterator[RawSample]:
    st = preset.streaming
    for i in range(start, start + count):
        s = make_sample(i, split, pixel_frames, st.height, st.width, st.fps)
        yield RawSample(
            s.id, Image.fromarray(s.reference), Image.fromarray(s.garment), s.video, s.static_caption, s.dynamic_caption
        )


def build_init(vae: VideoVAE, out: Path, seed: int = 0) -> Path:
    """The checkpoint every stage starts from: random DiT, the trained VAE, the frozen text encoder."""
    preset = get_preset(PRESET)
    parts = build_random(preset, seed=seed, parts=frozenset({"dit", "text_encoder"}))
    vae_preset = preset.model_copy(update={"vae": vae.config})
    comps = Components(vae_preset, parts.dit, vae, parts.text_encoder, checkpoint_id="toy-init")
    return save_checkpoint(comps, out)


def to_16bit(src: Path, out: Path, checkpoint_id: str) -> Path:
    """Copy a checkpoint folder with float16 weights (the shipped form, about 4 MB)."""
    comps = load_checkpoint(src, dtype=torch.float16)
    comps.checkpoint_id = checkpoint_id
    if out.exists():
        shutil.rmtree(out)
    save_checkpoint(comps, out)
    if (src / "training.json").exists():
        shutil.copy(src / "training.json", out / "training.json")
    return out


def toy_reward(vae: VideoVAE):
    """GR-DMD frame reward of the toy world: flat colour regions with clean edges, as rendered.

    Decodes the frames and scores each by how little it deviates from its own 3x3 median (noise,
    blotches and smears score low; flat areas and sharp edges score high). Stands in for a
    learned aesthetic reward; returns [B, F] per latent frame.
    """
    from .rewards import pixel_to_latent_frames

    @torch.no_grad()
    def reward(latents: torch.Tensor) -> torch.Tensor:
        pixels = vae.decode(latents.to(vae.dtype)).float().clamp(-1, 1)  # [B, 3, T, H, W]
        b, _, t, h, w = pixels.shape
        x = pixels.permute(0, 2, 1, 3, 4).reshape(b * t, 3, h, w)
        patches = F.unfold(x, 3, padding=1).view(b * t, 3, 9, h * w)
        median = patches.median(dim=2).values.view(b * t, 3, h, w)
        score = -(x - median).abs().mean(dim=(1, 2, 3)).view(b, t) * 10
        return pixel_to_latent_frames(score, latents.shape[2], vae.temporal_factor).to(latents.device)

    return reward


def _stage(recipe, stage: str, run_dir: Path, max_steps: int):
    from .parallel import init_distributed, shutdown
    from .trainer import make_run

    info = init_distributed("cpu", 0, 1, 0)
    try:
        run = make_run(recipe, stage, run_dir, info)
        history = run.run(max_steps)
    finally:
        shutdown()
    return history


def _export(run_dir: Path, out: Path) -> dict:
    from .export import export

    if (out / "training.json").exists():
        return json.loads((out / "training.json").read_text())
    if out.exists():
        shutil.rmtree(out)
    return export(run_dir, out)


def run_toy(out_dir: str | Path, plan: ToyPlan | None = None, progress=None, log=print) -> dict:
    """Run (or resume) every step into `out_dir`; returns a summary with each stage's losses."""
    plan = plan or ToyPlan.full()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preset = get_preset(PRESET)
    summary: dict = {
        "plan": {
            "samples": plan.samples,
            "vae_steps": plan.vae.steps,
            "teacher_steps": plan.teacher_steps,
            "tf_steps": plan.tf_steps,
            "dmd_steps": plan.dmd_steps,
        }
    }

    vae_dir = out / "stage0-vae"
    if not (vae_dir / "vae" / "config.json").exists():
        log("stage 0: training the toy VAE")
        vae = train_vae(preset, vae_dir, plan.vae, progress=progress)
        vae.save_pretrained(vae_dir / "vae")
    vae = VideoVAE.from_pretrained(vae_dir / "vae")
    summary["vae"] = heldout_psnr(vae, preset, samples=4 if plan.samples < 100 else 8)
    summary["vae"]["loss_first_last"] = _first_last(vae_dir / "log.jsonl", "loss")
    log(f"stage 0: held-out PSNR {summary['vae']['psnr_db']:.2f} dB")

    init = out / "init"
    if not (init / "fashionchameleon.json").exists():
        build_init(vae, init)
    data = out / "data"
    if not (data / "index.json").exists():
        log(f"data: rendering and encoding {plan.samples} training samples")
        comps = load_checkpoint(init, parts=frozenset({"vae", "text_encoder"}))
        samples = raw_samples(plan.samples, "train", comps.preset, plan.pixel_frames)
        if progress:
            samples = progress(samples, total=plan.samples, desc="data: encode")
        tmp = out / "data.partial"
        if tmp.exists():
            shutil.rmtree(tmp)
        preprocess(samples, comps, tmp, max_pixel_frames=plan.pixel_frames, samples_per_shard=250, dtype="float32")
        tmp.rename(data)

    src = {"preset": PRESET}
    ckpt_teacher, ckpt_tf, ckpt_student = out / "ckpt-teacher", out / "ckpt-teacher-forcing", out / "ckpt-student"
    stages = [
        ("teacher", {"teacher.model": {**src, "checkpoint": str(init)}}, plan.teacher_steps, ckpt_teacher),
        (
            "teacher_forcing",
            {"teacher_forcing.model": {**src, "checkpoint": str(ckpt_teacher)}},
            plan.tf_steps,
            ckpt_tf,
        ),
        (
            "dmd",
            {
                "dmd.generator": {**src, "checkpoint": str(ckpt_tf)},
                "dmd.score": {**src, "checkpoint": str(ckpt_teacher)},
            },
            plan.dmd_steps,
            ckpt_student,
        ),
    ]
    for stage, sources, steps, ckpt in stages:
        overrides = {**sources, f"{stage}.data.root": str(data), f"{stage}.run.max_steps": steps}
        if plan.samples < 100:
            overrides[f"{stage}.run.checkpoint_every"] = max(steps // 2, 1)
        recipe = load_recipe("toy", overrides)
        run_dir = out / stage
        if not (ckpt / "training.json").exists():
            log(f"stage {stage}: {steps} steps")
            _stage(recipe, stage, run_dir, steps)
        summary[stage] = {"export": _export(run_dir, ckpt)}
        key = "generator_loss" if stage == "dmd" else "loss"
        summary[stage]["loss_first_last"] = _first_last(run_dir / "metrics.jsonl", key)
        if stage == "dmd":
            summary[stage]["fake_loss_first_last"] = _first_last(run_dir / "metrics.jsonl", "fake_loss")

    final = out / "checkpoint"
    student_id = json.loads((ckpt_student / "training.json").read_text())["checkpoint_id"]
    to_16bit(ckpt_student, final, f"toy-{student_id.split('-', 1)[1]}")
    summary["checkpoint"] = str(final)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def run_plain_dmd(out_dir: str | Path, plan: ToyPlan | None = None) -> dict:
    """The GR-DMD ablation: stage 3 again with a constant reward (plain DMD), same seed and steps,
    into DIR/dmd-plain -> DIR/ckpt-student-plain. Needs a finished `run_toy` in `out_dir`."""
    plan = plan or ToyPlan.full()
    out = Path(out_dir)
    src = {"preset": PRESET}
    recipe = load_recipe(
        "toy",
        {
            "dmd.generator": {**src, "checkpoint": str(out / "ckpt-teacher-forcing")},
            "dmd.score": {**src, "checkpoint": str(out / "ckpt-teacher")},
            "dmd.data.root": str(out / "data"),
            "dmd.run.max_steps": plan.dmd_steps,
            "dmd.reward.kind": "constant",
        },
    )
    ckpt = out / "ckpt-student-plain"
    if not (ckpt / "training.json").exists():
        _stage(recipe, "dmd", out / "dmd-plain", plan.dmd_steps)
    return _export(out / "dmd-plain", ckpt)


def _first_last(log_file: Path, key: str, window: int = 10) -> tuple[float, float] | None:
    """Mean of `key` over the first and the last `window` logged rows (a loss going down)."""
    if not log_file.exists():
        return None
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    vals = [float(r[key]) for r in rows if key in r]
    if not vals:
        vals = [float(r["metrics"][key]) for r in rows if key in r.get("metrics", {})]
    if not vals:
        return None
    w = max(1, min(window, len(vals) // 2 or 1))
    return float(np.mean(vals[:w])), float(np.mean(vals[-w:]))
