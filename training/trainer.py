"""The training loops: one for the supervised stages (teacher, teacher forcing), one for GR-DMD.

Both loops share the plumbing: a keyed-random data stream (`training.data.dataset`), models built
from a `ModelSource` and prepared by `training.parallel` (FSDP2 or not), AdamW with the stage's
learning-rate schedule, DCP checkpoints with exact resume, and rank-0 metrics. A global step
consumes world x batch x grad_accum samples; losses and metrics are averages over all of them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from shared.models.attention import use_attention_backend
from shared.models.rope import RopeTable
from shared.storage.config import StorageConfig
from shared.storage.factory import open_store

from .checkpointing import CheckpointManager
from .config import (
    DataConfig,
    DMDStage,
    OptimConfig,
    Recipe,
    TeacherForcingStage,
    TeacherStage,
)
from .data.dataset import LatentDataset, SampleStream, ShardSource, collate
from .dmd import GRDMD
from .metrics import MetricLogger
from .models import apply_finetune, load_components, load_dit, source_preset
from .parallel import DistInfo, autocast, compute_dtype, prepare_model, use_fsdp
from .rewards import make_reward
from .teacher import TeacherObjective
from .teacher_forcing import TeacherForcingObjective


def open_source(cfg: DataConfig, credentials: tuple[str, str] | None = None) -> ShardSource:
    """A dataset folder, or an s3:// URL (shards mirrored into `cache_dir`)."""
    if cfg.root is None:
        raise ValueError("data.root is not set (a preprocessed dataset folder or an s3:// URL)")
    if cfg.root.startswith("s3://"):
        access, secret = credentials or (None, None)
        store = open_store(StorageConfig.from_url(cfg.root, access_key=access, secret_key=secret))
        return ShardSource(store=store, cache_dir=cfg.cache_dir)
    root = cfg.root.removeprefix("file://")
    return ShardSource(root=root)


def make_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr_at(0), betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def clip_and_norm(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Clip gradients to `max_norm` (if set); returns the total L2 norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def write_run_info(run_dir: Path, recipe: Recipe, stage: str, info: DistInfo) -> None:
    path = run_dir / "run.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous.get("stage") != stage:
            raise ValueError(f"{run_dir} holds a {previous.get('stage')!r} run, not {stage!r}")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        payload = {"stage": stage, "world_size": info.world_size, "recipe": recipe.model_dump(mode="json")}
        path.write_text(json.dumps(payload, indent=2) + "\n")


def read_run_info(run_dir: str | Path) -> tuple[str, Recipe]:
    data = json.loads((Path(run_dir) / "run.json").read_text())
    return data["stage"], Recipe.model_validate(data["recipe"])


class _Run:
    """Shared set-up: data stream, RoPE, checkpoints, logging."""

    stage_name: str

    def __init__(
        self,
        recipe: Recipe,
        stage_name: str,
        run_dir: str | Path,
        info: DistInfo,
        preset,
        data: DataConfig,
        run_cfg,
        credentials=None,
    ):
        self.recipe, self.stage_name, self.info = recipe, stage_name, info
        self.run_dir = Path(run_dir)
        self.run_cfg = run_cfg
        self.preset = preset
        write_run_info(self.run_dir, recipe, stage_name, info)
        self.dataset = LatentDataset(open_source(data, credentials), min_latent_frames=data.latent_frames)
        self.dataset.index.check_compatible(preset.dit.in_channels, preset.latent_hw(), preset.dit.text_dim)
        self.batch = data.batch_size
        self.accum = run_cfg.grad_accum
        self.stream = SampleStream(
            self.dataset,
            seed=run_cfg.seed,
            per_rank=self.batch * self.accum,
            rank=info.rank,
            world_size=info.world_size,
            latent_frames=data.latent_frames,
            shuffle=data.shuffle,
        )
        self.rope = RopeTable(preset.dit.attention_head_dim, preset.token_grid(), device=info.device)
        self.checkpoints = CheckpointManager(self.run_dir, info, run_cfg.keep_checkpoints)
        self.step = 0

    def micro_batches(self):
        """(batch dict, global positions) per micro-step of the next global step, on this rank."""
        samples, positions = self.stream.next_batch()
        for a in range(self.accum):
            sl = slice(a * self.batch, (a + 1) * self.batch)
            yield collate(samples[sl], self.info.device), positions[sl]

    def _models(self) -> dict:
        raise NotImplementedError

    def _optimizers(self) -> dict:
        raise NotImplementedError

    def _counters(self) -> dict:
        return {}

    def _set_counters(self, state: dict) -> None:
        pass

    def resume(self) -> bool:
        latest = self.checkpoints.latest()
        if latest is None:
            return False
        state = self.checkpoints.load(latest, self._models(), self._optimizers())
        self.step = int(state["step"])
        self.stream.load_state_dict(state["data"])
        self._set_counters(state.get("counters", {}))
        return True

    def save(self) -> Path:
        state = {"data": self.stream.state_dict(), "stage": self.stage_name, "counters": self._counters()}
        return self.checkpoints.save(self.step, self._models(), self._optimizers(), state)

    def train_step(self) -> dict:
        raise NotImplementedError

    def run(self, max_steps: int | None = None) -> list[dict]:
        """Train up to `max_steps` (default: the recipe's); checkpoints periodically and at the end."""
        total = self.run_cfg.max_steps if max_steps is None else max_steps
        c = self.run_cfg
        logger = MetricLogger(self.run_dir, self.info.is_main, c.tensorboard, c.progress, total, self.step)
        history = []
        try:
            with use_attention_backend(c.attention_backend):
                while self.step < total:
                    metrics = self.train_step()
                    history.append({"step": self.step - 1, **metrics})
                    if (self.step - 1) % c.log_every == 0 or self.step == total:
                        logger.log(self.step - 1, metrics)
                    logger.advance()
                    if self.step % c.checkpoint_every == 0 or self.step == total:
                        self.save()
        finally:
            logger.close()
        return history


class SupervisedRun(_Run):
    """Teacher (stage 1) or teacher forcing (stage 2): one model, one optimizer, one objective."""

    def __init__(self, recipe: Recipe, stage_name: str, run_dir, info: DistInfo, credentials=None):
        stage: TeacherStage | TeacherForcingStage = recipe.stage(stage_name)
        super().__init__(
            recipe, stage_name, run_dir, info, source_preset(stage.model), stage.data, stage.run, credentials
        )
        self.cfg = stage
        model = load_dit(stage.model)
        apply_finetune(model, stage.finetune)
        self.fsdp = use_fsdp(stage.parallel, info)
        self.model = prepare_model(model, stage.parallel, info)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, stage.optim)
        seed = stage.run.seed
        if stage_name == "teacher":
            self.objective = TeacherObjective(self.preset, stage.flow, stage.data, seed, self.rope)
        else:
            self.objective = TeacherForcingObjective(
                self.preset, stage.flow, stage.data, seed, self.rope, stage.per_chunk_timesteps, stage.attention
            )
        self.resume()

    def _models(self):
        return {"model": self.model}

    def _optimizers(self):
        return {"model": (self.model, self.optimizer)}

    def train_step(self) -> dict:
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.optim.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for batch, positions in self.micro_batches():
            with autocast(self.cfg.parallel, self.info, self.fsdp):
                loss, metrics = self.objective.loss(self.model, batch, positions)
            (loss / self.accum).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / self.accum
        grad_norm = clip_and_norm(self.params, self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        out = {k: self.info.mean(v) for k, v in sums.items()}
        return {**out, "grad_norm": grad_norm, "lr": self.optimizer.param_groups[0]["lr"]}


class DMDRun(_Run):
    """GR-DMD (stage 3): generator + fake score trained at 1:N, real score frozen."""

    def __init__(self, recipe: Recipe, run_dir, info: DistInfo, credentials=None, reward=None):
        cfg: DMDStage = recipe.dmd
        super().__init__(recipe, "dmd", run_dir, info, source_preset(cfg.generator), cfg.data, cfg.run, credentials)
        self.cfg = cfg
        self.fsdp = use_fsdp(cfg.parallel, info)
        self.generator = prepare_model(load_dit(cfg.generator), cfg.parallel, info)
        self.fake = prepare_model(load_dit(cfg.score), cfg.parallel, info)
        self.real = prepare_model(load_dit(cfg.score).requires_grad_(False).eval(), cfg.parallel, info)
        self.gen_params = [p for p in self.generator.parameters() if p.requires_grad]
        self.fake_params = [p for p in self.fake.parameters() if p.requires_grad]
        self.gen_optimizer = make_optimizer(self.gen_params, cfg.generator_optim)
        self.fake_optimizer = make_optimizer(self.fake_params, cfg.fake_optim)
        if reward is None and cfg.reward.kind != "constant":
            vae = load_components(cfg.score, frozenset({"vae"})).vae.to(info.device)
            reward = make_reward(cfg.reward.kind, vae)
        elif reward is None:
            reward = make_reward("constant")
        null_text = self.dataset.null_text() if cfg.real_guidance_scale != 1.0 else None
        dtype = compute_dtype(cfg.parallel) if self.fsdp else torch.float32
        self.objective = GRDMD(self.preset, cfg, cfg.run.seed, self.rope, reward, null_text, info.device, dtype)
        self.generator_steps = 0
        self.fake_steps = 0
        self.resume()

    def _models(self):
        return {"generator": self.generator, "fake": self.fake}

    def _optimizers(self):
        return {"generator": (self.generator, self.gen_optimizer), "fake": (self.fake, self.fake_optimizer)}

    def _counters(self):
        return {"generator_steps": self.generator_steps, "fake_steps": self.fake_steps}

    def _set_counters(self, state: dict) -> None:
        self.generator_steps = int(state.get("generator_steps", 0))
        self.fake_steps = int(state.get("fake_steps", 0))

    def _update(self, optimizer, params, optim_cfg: OptimConfig, opt_step: int, loss_fn) -> dict:
        for group in optimizer.param_groups:
            group["lr"] = optim_cfg.lr_at(opt_step)
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for batch, positions in self.micro_batches():
            with autocast(self.cfg.parallel, self.info, self.fsdp):
                loss, metrics = loss_fn(batch, positions)
            (loss / self.accum).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / self.accum
        norm = clip_and_norm(params, optim_cfg.max_grad_norm)
        optimizer.step()
        return {**{k: self.info.mean(v) for k, v in sums.items()}, "grad_norm": norm}

    def train_step(self) -> dict:
        out: dict[str, float] = {}
        obj, step = self.objective, self.step
        if step % self.cfg.fake_updates_per_generator == 0:
            gen = self._update(
                self.gen_optimizer,
                self.gen_params,
                self.cfg.generator_optim,
                self.generator_steps,
                lambda b, p: obj.generator_loss(self.generator, self.fake, self.real, b, p, step),
            )
            self.generator_steps += 1
            out.update({k if k != "grad_norm" else "generator_grad_norm": v for k, v in gen.items()})
        fake = self._update(
            self.fake_optimizer,
            self.fake_params,
            self.cfg.fake_optim,
            self.fake_steps,
            lambda b, p: obj.fake_loss(self.generator, self.fake, b, p, step),
        )
        self.fake_steps += 1
        out.update({k if k != "grad_norm" else "fake_grad_norm": v for k, v in fake.items()})
        self.step += 1
        return {**out, "generator_steps": self.generator_steps, "fake_steps": self.fake_steps}


def make_run(recipe: Recipe, stage: str, run_dir, info: DistInfo, credentials=None) -> _Run:
    if stage in ("teacher", "teacher_forcing"):
        return SupervisedRun(recipe, stage, run_dir, info, credentials)
    if stage == "dmd":
        return DMDRun(recipe, run_dir, info, credentials)
    raise ValueError(f"unknown stage {stage!r}")
