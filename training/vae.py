"""Stage 0: train a preset's video VAE (`AutoencoderKLWan`) on rendered toy-world pixels.

The real Wan2.2 VAE comes pretrained; a toy preset's VAE has to be trained. The architecture is
diffusers' `AutoencoderKLWan` unchanged (causal 3D convolutions, 4x temporal compression: one
latent frame for the first pixel frame, then one per 4), so streamed decode equals whole decode as
for the real one. Data: short clips (1 + 4k frames) of training-split scenes plus single images
(reference-style frames and white-padded garment images, which the pipeline encodes as one-frame
videos). Loss: L1 + MSE on pixels + a small KL term. After training, the per-channel mean and std of
the posterior means over a sample of clips become `latents_mean` / `latents_std` in the VAE config
(the normalization the DiT sees), as Wan ships them.

Resumable: the run folder keeps `vae-state.pt` (weights, optimizer, step, RNG), written every
`checkpoint_every` steps; a rerun continues from it. Progress goes to `log.jsonl` and a bar.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shared.media.image_tensors import to_tensor
from shared.media.images import prepare_garment
from shared.models.presets import Preset
from shared.models.vae import VideoVAE
from shared.toyworld.render import render_clip, render_garment, sample_scene

STATE_FILE = "vae-state.pt"


@dataclass(frozen=True)
class VAETrainConfig:
    """Two phases: short clips (fast; the spatial code), then longer ones from `long_from`, so that
    the causal temporal caches are trained in their steady state (a clip of 5 frames only ever
    shows the first two latent groups, and later frames then drift in colour)."""

    steps: int = 1800
    clip_frames: int = 5  # 1 + 4k pixel frames per training clip
    clips_per_step: int = 3
    long_from: int = 1200
    long_clip_frames: int = 13  # four latent frames: the cache's steady state
    long_clips_per_step: int = 2
    long_lr: float = 3e-4
    images_per_step: int = 2  # one-frame inputs: first frames and padded garment images
    lr: float = 1e-3
    min_lr: float = 1e-4
    kl_weight: float = 1e-4
    seed: int = 0
    checkpoint_every: int = 100
    stats_samples: int = 64


def _pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def toy_batch(
    preset: Preset, rng: np.random.Generator, clips: int, frames: int, images: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clips [B, 3, frames, H, W], images [B', 3, 1, H, W]) of training-split pixels."""
    st = preset.streaming
    vids = []
    for _ in range(clips):
        scene = sample_scene(rng, "train")
        start = int(rng.integers(0, 40))
        vids.append(_pixels(render_clip(scene, frames, st.height, st.width, st.fps, start=start)))
    imgs = []
    for i in range(images):
        scene = sample_scene(rng, "train")
        if i % 2 == 0:
            garment = prepare_garment(Image.fromarray(render_garment(scene.top)), st.height, st.width)
            imgs.append(to_tensor(garment)[:, None])  # [3, 1, H, W]
        else:
            imgs.append(_pixels(render_clip(scene, 1, st.height, st.width, st.fps)))
    return torch.stack(vids), torch.stack(imgs)


def _kl(dist) -> torch.Tensor:
    return 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar).mean()


def _recon_loss(vae: VideoVAE, x: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, dict]:
    dist = vae.module.encode(x).latent_dist
    y = vae.module.decode(dist.sample()).sample
    l1, l2 = F.l1_loss(y, x), F.mse_loss(y, x)
    kl = _kl(dist)
    return l1 + 0.5 * l2 + kl_weight * kl, {"l1": l1.item(), "mse": l2.item(), "kl": kl.item()}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two pixel tensors in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def _lr(cfg: VAETrainConfig, step: int) -> float:
    """Warm-up, then a cosine from lr to min_lr over phase 1; phase 2 restarts a cosine at long_lr."""
    warm = 30
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if step < cfg.long_from:
        top, start, end = cfg.lr, warm, cfg.long_from
    else:
        top, start, end = cfg.long_lr, cfg.long_from, cfg.steps
    frac = (step - start) / max(end - start, 1)
    return cfg.min_lr + 0.5 * (top - cfg.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))


def train_vae(
    preset: Preset,
    run_dir: str | Path,
    cfg: VAETrainConfig = VAETrainConfig(),
    progress=None,
    max_steps: int | None = None,
) -> VideoVAE:
    """Train (or resume) the preset's VAE in `run_dir`; returns it with latent stats set once finished."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    vae = VideoVAE.build(preset.vae, seed=cfg.seed)
    vae.module.train()
    opt = torch.optim.AdamW(vae.module.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, rng = 0, np.random.default_rng(cfg.seed)
    state_path = run / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        vae.module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, rng.bit_generator.state = state["step"], state["rng"]
    stop = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    log_path = run / "log.jsonl"
    if log_path.exists():  # rows past the saved step came from an interrupted run: drop them
        rows = [r for r in log_path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
        log_path.write_text("".join(r + "\n" for r in rows))
    log = log_path.open("a")
    bar = progress(total=cfg.steps, initial=step, desc="stage 0: vae") if progress else None
    while step < stop:
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        long = step >= cfg.long_from
        clips, images = toy_batch(
            preset,
            rng,
            cfg.long_clips_per_step if long else cfg.clips_per_step,
            cfg.long_clip_frames if long else cfg.clip_frames,
            cfg.images_per_step,
        )
        t0 = time.perf_counter()
        loss_c, parts = _recon_loss(vae, clips, cfg.kl_weight)
        loss_i, parts_i = _recon_loss(vae, images, cfg.kl_weight)
        loss = loss_c + 0.5 * loss_i
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.module.parameters(), 1.0)
        opt.step()
        step += 1
        row = {
            "step": step,
            "loss": loss.item(),
            **parts,
            "image_l1": parts_i["l1"],
            "seconds": time.perf_counter() - t0,
        }
        log.write(json.dumps(row) + "\n")
        log.flush()
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", l1=f"{row['l1']:.4f}")
        if step % cfg.checkpoint_every == 0 or step == stop:
            torch.save(
                {
                    "model": vae.module.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "rng": rng.bit_generator.state,
                },
                state_path.with_suffix(".tmp"),
            )
            state_path.with_suffix(".tmp").replace(state_path)
    if bar:
        bar.close()
    log.close()
    vae.module.eval()
    if step >= cfg.steps:
        vae = with_latent_stats(vae, preset, cfg)
    return vae


@torch.no_grad()
def with_latent_stats(vae: VideoVAE, preset: Preset, cfg: VAETrainConfig) -> VideoVAE:
    """A copy of `vae` whose config holds the per-channel mean/std of its latents on training pixels."""
    rng = np.random.default_rng(cfg.seed + 7)
    zs = []
    for _ in range(cfg.stats_samples // 4):
        clips, images = toy_batch(preset, rng, 3, 9, 2)
        for x in (clips, images):
            zs.append(vae.module.encode(x).latent_dist.mode().transpose(0, 1).reshape(vae.z_dim, -1))
    z = torch.cat(zs, dim=1)
    mean, std = z.mean(dim=1), z.std(dim=1).clamp_min(1e-3)
    cfg_new = vae.config.model_copy(
        update={
            "latents_mean": tuple(round(float(v), 5) for v in mean),
            "latents_std": tuple(round(float(v), 5) for v in std),
        }
    )
    out = VideoVAE.build(cfg_new)
    out.module.load_state_dict(vae.module.state_dict())
    return VideoVAE(out.module.eval())


@torch.no_grad()
def heldout_psnr(vae: VideoVAE, preset: Preset, samples: int = 8, frames: int = 21) -> dict:
    """Reconstruction PSNR (dB) on held-out (test-split) clips: whole decode, and streamed == whole."""
    from shared.runtime.decode import StreamingDecoder

    st = preset.streaming
    rng = np.random.default_rng(12345)
    scores, stream_diff = [], 0.0
    for _ in range(samples):
        scene = sample_scene(rng, "test")
        x = _pixels(render_clip(scene, frames, st.height, st.width, st.fps))[None]
        lat = vae.encode_video(x)
        whole = vae.decode(lat).clamp(-1, 1)
        scores.append(psnr(whole, x))
        dec = StreamingDecoder(vae)
        parts = [dec.decode_chunk(lat[:, :, i : i + 3]) for i in range(0, lat.shape[2], 3)]
        stream_diff = max(stream_diff, float((torch.cat(parts, dim=2).clamp(-1, 1) - whole).abs().max()))
    return {
        "psnr_db": float(np.mean(scores)),
        "psnr_min_db": float(np.min(scores)),
        "stream_vs_whole_max_abs": stream_diff,
    }
