"""Training stage: distil a checkpoint's VAE decoder into a `FastCausalDecoder`.

The teacher is the checkpoint's own streaming VAE decoder; the data are latents of rendered
toy-world clips (the VAE encoder's, half of them perturbed with Gaussian noise so the student
also follows the teacher off the data manifold), and, with `dit_sessions`, latent streams the
checkpoint's own DiT generates for training-split people and garments (what the decoder sees
when serving, switches included), each paired with the teacher's decode of exactly those
latents; batches alternate between the two sets. The loss is L1 + MSE against the teacher's frames
(not the ground truth): the student copies the decoder the DiT was trained with.

Reported at the end (and written to `fast_decoder/training.json`): PSNR against the teacher's
frames on held-out (test-split) clips streamed in 3-latent-frame chunks, and the decode speed of
both (one chunk of the preset's streaming size, this process's threads).

    fashionchameleon train fast-decoder --checkpoint checkpoints/toy [--steps 1500]

Resumable: `fast_decoder-state.pt` in the checkpoint folder (model, optimizer, step, RNG).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shared.models.fast_decoder import SUBFOLDER, FastCausalDecoder, FastDecoderConfig, first_group_frame
from shared.models.vae import VideoVAE
from shared.runtime.decode import StreamingDecoder, StreamingFastDecoder
from shared.toyworld.render import render_clip, sample_scene
from training.vae import _pixels, psnr  # the stage-0 VAE's helpers: pixels in [-1, 1], PSNR (peak-to-peak 2)

log = logging.getLogger(__name__)


@dataclass
class FastDecoderTrainConfig:
    steps: int = 1500
    clips: int = 96  # training clips (each also perturbed once: 2x pairs)
    frames: int = 13  # pixel frames per clip (4 latent frames)
    batch: int = 4
    lr: float = 2e-3
    min_lr: float = 1e-4
    noise: float = 0.15  # std of the latent perturbation (normalized units)
    eval_clips: int = 6
    seed: int = 0
    log_every: int = 50
    dit_sessions: int = 0  # generated latent streams (0: encoded clips only)
    dit_chunks: int = 4  # chunks per generated stream (a garment switch at the middle one)
    finetune: bool = False  # start from the checkpoint's fast_decoder/ (else a fresh init)


def teacher_pairs(
    vae: VideoVAE, height: int, width: int, fps: int, *, clips: int, frames: int, noise: float, split: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents [N, z, f, h, w], teacher pixels [N, 3, F, H, W] as float16) of rendered clips."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    gen = torch.Generator().manual_seed(seed)
    lats, outs = [], []
    for _ in range(clips):
        x = _pixels(render_clip(sample_scene(rng, split), frames, height, width, fps))[None]
        with torch.no_grad():
            lat = vae.encode_video(x)
        variants = [lat] if noise <= 0 else [lat, lat + noise * torch.randn(lat.shape, generator=gen)]
        for z in variants:
            lats.append(z[0])
            outs.append(StreamingDecoder(vae).decode_chunk(z)[0].half())
    return torch.stack(lats), torch.stack(outs)


def dit_pairs(
    checkpoint: Path, vae: VideoVAE, *, sessions: int, chunks: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents [N, z, 3 chunks, h, w], teacher pixels [N, 3, F, H, W] float16) of streams the
    checkpoint's DiT generates for training-split samples, decoded by the teacher from stream start."""
    from PIL import Image

    from shared.runtime.pipeline import Engine
    from shared.toyworld.samples import make_sample

    engine = Engine.from_checkpoint(checkpoint)
    st = engine.preset.streaming
    lats, outs = [], []
    for i in range(sessions):
        a, b = (
            make_sample(2 * i, "train", 1, st.height, st.width),
            make_sample(2 * i + 1, "train", 1, st.height, st.width),
        )
        session = engine.session()
        session.open(Image.fromarray(a.reference), Image.fromarray(a.garment), a.dynamic_caption, seed=seed + i)
        stream = []
        for k in range(chunks):
            if k == chunks // 2:
                session.switch_garment(Image.fromarray(b.garment))
            stream.append(session.next_chunk().latents)
        z = torch.cat(stream, dim=2)
        lats.append(z[0])
        outs.append(StreamingDecoder(vae).decode_chunk(z)[0].half())
    return torch.stack(lats), torch.stack(outs)


def _student_frames(model: FastCausalDecoder, latents: torch.Tensor) -> torch.Tensor:
    """A batch decoded as new streams: the first latent frame gives one frame."""
    pixels, _ = model(latents)
    tf = model.config.temporal_factor
    keep = first_group_frame(tf)
    return torch.cat([pixels[:, :, keep : keep + 1], pixels[:, :, tf:]], dim=2)


def _lr(cfg: FastDecoderTrainConfig, step: int) -> float:
    warm = 50
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def evaluate(
    vae: VideoVAE,
    model: FastCausalDecoder,
    height: int,
    width: int,
    fps: int,
    *,
    clips: int = 6,
    frames: int = 21,
    chunk: int = 3,
) -> dict:
    """PSNR (dB) of the student against the teacher on held-out clips, both streamed in chunks,
    and one chunk's decode time of each (median of 5, this process's threads)."""
    rng = np.random.default_rng(4242)
    scores = []
    for _ in range(clips):
        x = _pixels(render_clip(sample_scene(rng, "test"), frames, height, width, fps))[None]
        with torch.no_grad():
            lat = vae.encode_video(x)
        teacher, student = StreamingDecoder(vae), StreamingFastDecoder(model, vae.z_dim)
        t = torch.cat([teacher.decode_chunk(lat[:, :, i : i + chunk]) for i in range(0, lat.shape[2], chunk)], 2)
        s = torch.cat([student.decode_chunk(lat[:, :, i : i + chunk]) for i in range(0, lat.shape[2], chunk)], 2)
        scores.append(psnr(s, t))
    z = torch.randn(1, vae.z_dim, chunk, height // vae.spatial_factor, width // vae.spatial_factor)

    def timed(decoder) -> float:
        decoder.decode_chunk(z)  # warm: a steady-state chunk, not a stream's first
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            decoder.decode_chunk(z)
            runs.append(time.perf_counter() - started)
        return float(np.median(runs))

    full_s, fast_s = timed(StreamingDecoder(vae)), timed(StreamingFastDecoder(model, vae.z_dim))
    return {
        "psnr_db": float(np.mean(scores)),
        "psnr_min_db": float(np.min(scores)),
        "full_chunk_s": full_s,
        "fast_chunk_s": fast_s,
        "decode_speedup": full_s / fast_s,
        "threads": torch.get_num_threads(),
    }


def train_fast_decoder(
    checkpoint: str | Path,
    cfg: FastDecoderTrainConfig | None = None,
    model_config: FastDecoderConfig | None = None,
    progress=None,
) -> dict:
    """Distil `checkpoint/vae` into `checkpoint/fast_decoder`; returns the evaluation."""
    from shared.models.checkpoint import read_preset

    cfg = cfg or FastDecoderTrainConfig()
    root = Path(checkpoint)
    preset, _ = read_preset(root)
    st = preset.streaming
    vae = VideoVAE.from_pretrained(root / "vae")
    torch.manual_seed(cfg.seed)
    model = FastCausalDecoder(
        model_config or FastDecoderConfig.for_vae(vae.z_dim, vae.spatial_factor, vae.temporal_factor)
    )
    if model.config.spatial_factor != vae.spatial_factor:
        raise ValueError(f"the fast decoder upsamples {model.config.spatial_factor}x, the VAE {vae.spatial_factor}x")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    if cfg.finetune:
        model.load_state_dict(FastCausalDecoder.load(root / SUBFOLDER).state_dict())
    state_path = root / "fast_decoder-state.pt"
    step = 0
    if state_path.exists():
        saved = torch.load(state_path, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        step = saved["step"]
        log.info("fast decoder: resumed at step %d", step)
    started = time.perf_counter()
    latents, targets = teacher_pairs(
        vae,
        st.height,
        st.width,
        st.fps,
        clips=cfg.clips,
        frames=cfg.frames,
        noise=cfg.noise,
        split="train",
        seed=cfg.seed,
    )
    sets = [(latents, targets)]
    if cfg.dit_sessions > 0:
        sets.append(dit_pairs(root, vae, sessions=cfg.dit_sessions, chunks=cfg.dit_chunks, seed=cfg.seed))
    log.info(
        "fast decoder: %s teacher pairs in %.0f s",
        "+".join(str(len(x)) for x, _ in sets),
        time.perf_counter() - started,
    )
    rng = np.random.default_rng([cfg.seed, step])
    model.train()
    while step < cfg.steps:
        lat_set, target_set = sets[step % len(sets)]  # alternate encoded clips / generated streams
        idx = torch.from_numpy(rng.choice(len(lat_set), size=min(cfg.batch, len(lat_set)), replace=False))
        out = _student_frames(model, lat_set[idx])
        target = target_set[idx].float()
        loss = F.l1_loss(out, target) + F.mse_loss(out, target)
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if progress is not None:
            progress(step, cfg.steps, loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.info("fast decoder: step %d/%d loss %.4f", step, cfg.steps, loss.item())
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, state_path)
    model.eval()
    report = evaluate(vae, model, st.height, st.width, st.fps, clips=cfg.eval_clips)
    out_dir = model.save(root / SUBFOLDER)
    (out_dir / "training.json").write_text(json.dumps({"config": asdict(cfg), "eval": report}, indent=2) + "\n")
    state_path.unlink(missing_ok=True)
    return report
