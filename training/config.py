"""Typed training recipes: one pydantic config per component, one recipe per model size.

A `Recipe` holds the three stages (teacher, teacher forcing, GR-DMD). Stage hyper-parameters
default to the paper's appendix B; `tiny` shrinks steps, batch and learning rates so that the
same code runs on a CPU in seconds. `load_recipe` accepts a registered name, a JSON file, or a
JSON object (`{"base": "tiny", ...}` deep-merges onto a registered recipe), plus dotted
`key=value` overrides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Dtype = Literal["float32", "bfloat16"]


class _Cfg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSource(_Cfg):
    """Where weights start: a checkpoint folder (diffusers layout) or random weights of a preset."""

    preset: str = "tiny"
    checkpoint: str | None = None  # folder with transformer/ (+ vae/, text_encoder/ for export)
    weights_seed: int = 0


class DataConfig(_Cfg):
    root: str | None = None  # a preprocessed folder, or an object-store URL (file:// or s3://...)
    cache_dir: str | None = None  # local mirror of shards read from an object store
    latent_frames: int = 21  # training clip length (81 pixel frames)
    batch_size: int = 1  # per rank and micro-step
    shuffle: bool = True
    dynamic_caption_prob: float = Field(0.0, ge=0.0, le=1.0)  # P(dynamic-only caption); else full caption


class OptimConfig(_Cfg):
    """AdamW with linear warm-up, then a piecewise-constant learning rate."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_steps: tuple[tuple[int, float], ...] = ()  # (from step, lr) after warm-up, ascending
    max_grad_norm: float | None = 1.0  # not in the paper; clipping is common practice for DiTs

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        lr = self.lr
        for start, value in self.lr_steps:
            if step >= start:
                lr = value
        return lr


class FinetuneConfig(_Cfg):
    """Which parameters train (paper Table 2): all, the attention projections, or LoRA adapters."""

    mode: Literal["full", "attention", "lora"] = "full"
    lora_rank: int = 64
    lora_alpha: int = 64
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


class FlowConfig(_Cfg):
    """Training timesteps: u ~ U(min, max), sigma = shift * u / (1 + (shift - 1) u), t = 1000 sigma."""

    shift: float = 5.0
    min_u: float = 0.0
    max_u: float = 1.0


class ParallelConfig(_Cfg):
    """FSDP2 over all ranks (used when world_size > 1, or when `fsdp` forces it on one rank)."""

    fsdp: Literal["auto", "on", "off"] = "auto"
    param_dtype: Dtype = "bfloat16"  # compute dtype of sharded params (mixed precision)
    reduce_dtype: Dtype = "float32"  # gradient reduce-scatter dtype; the master weights stay fp32
    reshard_after_forward: bool = True
    activation_checkpointing: bool = True


class RunConfig(_Cfg):
    max_steps: int
    grad_accum: int = 1
    seed: int = 0
    device: str = "cpu"
    attention_backend: str = "auto"  # shared registry: auto | math | sdpa | flash
    log_every: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True


class TeacherStage(_Cfg):
    model: ModelSource = ModelSource()
    data: DataConfig = DataConfig(dynamic_caption_prob=0.7)
    optim: OptimConfig = OptimConfig(
        lr=1e-5, betas=(0.9, 0.999), weight_decay=0.01, warmup_steps=200, lr_steps=((1100, 5e-6),)
    )
    finetune: FinetuneConfig = FinetuneConfig()
    flow: FlowConfig = FlowConfig()
    parallel: ParallelConfig = ParallelConfig()
    run: RunConfig = RunConfig(max_steps=2300)


class TeacherForcingStage(_Cfg):
    model: ModelSource = ModelSource()  # the exported teacher
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig(lr=1e-6, betas=(0.0, 0.999), weight_decay=0.01)
    finetune: FinetuneConfig = FinetuneConfig()
    flow: FlowConfig = FlowConfig()
    parallel: ParallelConfig = ParallelConfig()
    run: RunConfig = RunConfig(max_steps=4000)
    per_chunk_timesteps: bool = True  # an independent noise level per noisy chunk
    attention: Literal["dense", "flex"] = "dense"  # dense bool mask (CPU, small) or flex BlockMask (GPU)


class RewardConfig(_Cfg):
    kind: str = "aesthetic-proxy"  # constant | aesthetic-proxy | "package.module:factory"
    tau: float = 0.2


class DMDStage(_Cfg):
    generator: ModelSource = ModelSource()  # the exported teacher-forcing model
    score: ModelSource = ModelSource()  # the exported teacher: real (frozen) and fake score
    data: DataConfig = DataConfig()
    generator_optim: OptimConfig = OptimConfig(lr=2e-6, betas=(0.0, 0.999), weight_decay=1e-2)
    fake_optim: OptimConfig = OptimConfig(lr=4e-7, betas=(0.0, 0.999), weight_decay=1e-2)
    parallel: ParallelConfig = ParallelConfig()
    run: RunConfig = RunConfig(max_steps=2000)  # fake-score steps: 400 generator steps x 5
    fake_updates_per_generator: int = 5
    reward: RewardConfig = RewardConfig()
    min_u: float = 0.02  # score timesteps: u ~ U(min_u, max_u), shifted like the flow
    max_u: float = 0.98
    shift: float = 5.0
    real_guidance_scale: float = 1.0  # classifier-free guidance of the real score (1 = off)
    exit_step_per_chunk: bool = True  # a fresh random exit step per chunk (Self-Forcing)

    @property
    def generator_steps(self) -> int:
        return self.run.max_steps // self.fake_updates_per_generator


Stage = TeacherStage | TeacherForcingStage | DMDStage
STAGES = ("teacher", "teacher_forcing", "dmd")


class Recipe(_Cfg):
    name: str
    teacher: TeacherStage = TeacherStage()
    teacher_forcing: TeacherForcingStage = TeacherForcingStage()
    dmd: DMDStage = DMDStage()

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        for stage in (self.teacher, self.teacher_forcing):
            if stage.data.latent_frames < 1:
                raise ValueError("data.latent_frames must be positive")
        return self

    def stage(self, name: str) -> Stage:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
        return getattr(self, name)


# ---- the registry ------------------------------------------------------------------------------
def _full_5b() -> Recipe:
    """Paper appendix B: global batch 64 (8 nodes x 8 GPUs x batch 1), bf16 + FSDP."""
    cuda = {"device": "cuda", "attention_backend": "auto", "checkpoint_every": 100}
    five_b = ModelSource(preset="wan2.2-ti2v-5b", checkpoint="checkpoints/Wan2.2-TI2V-5B-Diffusers")
    return Recipe(
        name="wan2.2-ti2v-5b",
        teacher=TeacherStage(model=five_b, run=RunConfig(max_steps=2300, **cuda)),
        teacher_forcing=TeacherForcingStage(
            model=ModelSource(preset="wan2.2-ti2v-5b", checkpoint="checkpoints/fc-teacher"),
            run=RunConfig(max_steps=4000, **cuda),
            attention="flex",
        ),
        dmd=DMDStage(
            generator=ModelSource(preset="wan2.2-ti2v-5b", checkpoint="checkpoints/fc-teacher-forcing"),
            score=ModelSource(preset="wan2.2-ti2v-5b", checkpoint="checkpoints/fc-teacher"),
            run=RunConfig(max_steps=2000, **cuda),
        ),
    )


def _tiny() -> Recipe:
    """CPU, seconds per stage: 2 x 3-frame chunks, fp32, no FSDP unless several ranks."""
    cpu = {
        "device": "cpu",
        "attention_backend": "math",
        "checkpoint_every": 10,
        "tensorboard": False,
        "progress": False,
    }
    par = ParallelConfig(param_dtype="float32", activation_checkpointing=False)
    tiny = ModelSource(preset="tiny")
    data = DataConfig(latent_frames=6, batch_size=1)
    return Recipe(
        name="tiny",
        teacher=TeacherStage(
            model=tiny,
            data=data.model_copy(update={"dynamic_caption_prob": 0.7}),
            optim=OptimConfig(lr=1e-3, warmup_steps=5, lr_steps=((200, 5e-4),)),
            parallel=par,
            run=RunConfig(max_steps=40, **cpu),
        ),
        teacher_forcing=TeacherForcingStage(
            model=tiny,
            data=data,
            optim=OptimConfig(lr=1e-4, betas=(0.0, 0.999)),
            parallel=par,
            run=RunConfig(max_steps=20, **cpu),
        ),
        dmd=DMDStage(
            generator=tiny,
            score=tiny,
            data=data,
            generator_optim=OptimConfig(lr=1e-4, betas=(0.0, 0.999)),
            fake_optim=OptimConfig(lr=1e-4, betas=(0.0, 0.999)),
            parallel=par,
            run=RunConfig(max_steps=10, **cpu),
            reward=RewardConfig(kind="aesthetic-proxy"),
        ),
    )


def _toy() -> Recipe:
    """The toy try-on world (shared/toyworld) on a 2-core CPU: `fashionchameleon train toy` runs
    stage 0 (VAE) and these three stages; model sources are set by that command (its init folder and
    each stage's export). Clips of 12 latent frames (45 pixel frames) = the streaming span 2 + 12."""
    cpu = {
        "device": "cpu",
        "attention_backend": "math",
        "checkpoint_every": 100,
        "tensorboard": False,
        "progress": True,
    }
    par = ParallelConfig(param_dtype="float32", activation_checkpointing=False)
    toy = ModelSource(preset="toy")
    data = DataConfig(latent_frames=12, batch_size=8)
    return Recipe(
        name="toy",
        teacher=TeacherStage(
            model=toy,
            data=data.model_copy(update={"dynamic_caption_prob": 0.7}),
            optim=OptimConfig(lr=6e-4, warmup_steps=50, lr_steps=((900, 2.5e-4),)),
            parallel=par,
            run=RunConfig(max_steps=1300, log_every=10, **cpu),
        ),
        teacher_forcing=TeacherForcingStage(
            model=toy,
            data=data.model_copy(update={"batch_size": 4, "dynamic_caption_prob": 0.7}),
            optim=OptimConfig(lr=2e-4, betas=(0.9, 0.999), warmup_steps=20),
            parallel=par,
            run=RunConfig(max_steps=450, log_every=10, **cpu),
        ),
        dmd=DMDStage(
            generator=toy,
            score=toy,
            data=data.model_copy(update={"batch_size": 2}),
            generator_optim=OptimConfig(lr=2e-5, betas=(0.0, 0.999)),
            fake_optim=OptimConfig(lr=1e-4, betas=(0.0, 0.999)),
            parallel=par,
            run=RunConfig(max_steps=150, log_every=5, **{**cpu, "checkpoint_every": 25}),
            reward=RewardConfig(kind="training.toy:toy_reward"),
        ),
    )


RECIPES = {"tiny": _tiny, "toy": _toy, "wan2.2-ti2v-5b": _full_5b}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]()
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}") from None


def _merge(base: dict, patch: dict) -> dict:
    out = dict(base)
    for key, value in patch.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        if not isinstance(node.get(key), dict):
            raise KeyError(f"override {dotted!r}: {key!r} is not a config section")
        node = node[key]
    if leaf not in node:
        raise KeyError(f"override {dotted!r}: no field {leaf!r}")
    node[leaf] = value


def parse_override(item: str) -> tuple[str, object]:
    """'a.b.c=VALUE' -> ('a.b.c', VALUE); VALUE is JSON when it parses, else a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} is not KEY=VALUE")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def load_recipe(spec: str | dict, overrides: list[str] | dict | None = None) -> Recipe:
    """A recipe from a registered name, a JSON file path, a JSON string or a dict, plus overrides."""
    if isinstance(spec, dict):
        data = spec
    elif spec in RECIPES:
        data = get_recipe(spec).model_dump(mode="json")
    elif spec.lstrip().startswith("{"):
        data = json.loads(spec)
    elif Path(spec).is_file():
        data = json.loads(Path(spec).read_text())
    else:
        raise KeyError(f"recipe {spec!r} is neither a registered name ({', '.join(sorted(RECIPES))}) nor a JSON file")
    if "base" in data:
        data = _merge(get_recipe(data["base"]).model_dump(mode="json"), {k: v for k, v in data.items() if k != "base"})
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for key, value in items:
        _set_dotted(data, key, value)
    return Recipe.model_validate(data)
