"""Checkpoint folders in the diffusers pipeline layout.

    <dir>/model_index.json        component -> (library, class), as diffusers writes it
    <dir>/transformer/            WanTransformer3DModel  (config.json + safetensors)
    <dir>/vae/                    AutoencoderKLWan
    <dir>/text_encoder/           UMT5EncoderModel       (transformers)
    <dir>/tokenizer/              tokenizer files        (transformers)
    <dir>/fashionchameleon.json   our streaming settings + preset name (optional)

A Wan2.2-TI2V-5B-Diffusers folder loads as-is: without `fashionchameleon.json`, the
streaming settings of the `wan2.2-ti2v-5b` preset apply. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .dit import InContextWanDiT
from .presets import (
    PRESETS,
    DiTConfig,
    Preset,
    StreamingConfig,
    TextEncoderConfig,
    TrainedRangeError,
    VAEConfig,
    get_preset,
    warn_beyond_trained,
)
from .text_encoder import TextEncoder
from .vae import VideoVAE

STREAMING_CONFIG = "fashionchameleon.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    pass


ALL_PARTS = frozenset({"dit", "vae", "text_encoder"})

# The toy try-on model trained by `fashionchameleon train toy` ships in the repository; commands
# without --checkpoint / --preset use it. FASHIONCHAMELEON_DEFAULT_CHECKPOINT points elsewhere.
DEFAULT_CHECKPOINT_ENV = "FASHIONCHAMELEON_DEFAULT_CHECKPOINT"
SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "toy"


def default_checkpoint() -> Path:
    """The checkpoint folder used when none is named: $FASHIONCHAMELEON_DEFAULT_CHECKPOINT or checkpoints/toy."""
    import os

    env = os.environ.get(DEFAULT_CHECKPOINT_ENV)
    path = Path(env) if env else SHIPPED_CHECKPOINT
    if not (path / STREAMING_CONFIG).is_file():
        raise CheckpointError(f"the default checkpoint {path} is missing; pass --checkpoint DIR or --preset NAME")
    return path


@dataclass
class Components:
    """Loaded components; a part not asked for is None (a decoder replica needs no DiT)."""

    preset: Preset
    dit: InContextWanDiT | None
    vae: VideoVAE | None
    text_encoder: TextEncoder | None
    checkpoint_id: str = "random"


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_random(
    preset: Preset, seed: int = 0, dtype: torch.dtype = torch.float32, parts: frozenset[str] = ALL_PARTS
) -> Components:
    """Random-weight components of a preset (deterministic for a seed; no file is read).

    Weights are created directly in `dtype`. A preset whose tokenizer is read from a checkpoint
    folder (the umT5 one) gets the byte-level tokenizer built in code: random weights have no
    vocabulary to honour, and nothing may be downloaded.
    """
    if preset.text_encoder.tokenizer == "folder":
        preset = preset.model_copy(
            update={"text_encoder": preset.text_encoder.model_copy(update={"tokenizer": "byte"})}
        )
    with _default_dtype(dtype):
        dit = InContextWanDiT.build(preset.dit, seed=seed).eval() if "dit" in parts else None
        vae = VideoVAE.build(preset.vae, seed=seed + 1) if "vae" in parts else None
        text = TextEncoder.build(preset.text_encoder, seed=seed + 2) if "text_encoder" in parts else None
    return Components(preset, dit, vae, text, checkpoint_id=f"random-{preset.name}-seed{seed}")


def save_checkpoint(components: Components, out_dir: str | Path) -> Path:
    dit, vae, text = components.dit, components.vae, components.text_encoder
    if dit is None or vae is None or text is None:
        raise ValueError("save_checkpoint needs all three parts (dit, vae, text_encoder)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dit.save_pretrained(out / "transformer")
    vae.save_pretrained(out / "vae")
    text.save_pretrained(out / "text_encoder", out / "tokenizer")
    index = {
        "_class_name": "FashionChameleonPipeline",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    preset = components.preset
    settings = {
        "format_version": FORMAT_VERSION,
        "preset": preset.name,
        "checkpoint_id": components.checkpoint_id,
        "streaming": preset.streaming.model_dump(mode="json"),
        "text_encoder": preset.text_encoder.model_dump(mode="json"),
    }
    (out / STREAMING_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: not a checkpoint folder") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def read_preset(path: str | Path) -> tuple[Preset, str]:
    """The preset a checkpoint folder describes (configs read from its component folders)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist")
    dit_cfg = _read_json(root / "transformer" / "config.json")
    vae_cfg = _read_json(root / "vae" / "config.json")
    settings = _read_json(root / STREAMING_CONFIG) if (root / STREAMING_CONFIG).exists() else {}
    base = PRESETS.get(settings.get("preset", "wan2.2-ti2v-5b"), get_preset("wan2.2-ti2v-5b"))
    dit = DiTConfig(**{k: dit_cfg[k] for k in DiTConfig.model_fields if k in dit_cfg})
    vae = VAEConfig(**{k: vae_cfg[k] for k in VAEConfig.model_fields if k in vae_cfg})
    if "text_encoder" in settings:
        text = TextEncoderConfig(**{**settings["text_encoder"], "tokenizer": "folder"})
    else:
        te = _read_json(root / "text_encoder" / "config.json")
        fields = {k: te[k] for k in TextEncoderConfig.model_fields if k in te}
        text = TextEncoderConfig(**{**fields, "tokenizer": "folder"})
    streaming = _streaming_settings(root, settings["streaming"]) if "streaming" in settings else base.streaming
    name = settings.get("preset", base.name)
    checkpoint_id = settings.get("checkpoint_id") or _folder_id(root)
    return Preset(name=name, dit=dit, vae=vae, text_encoder=text, streaming=streaming), checkpoint_id


def _streaming_settings(root: Path, streaming: dict) -> StreamingConfig:
    """The streaming settings a checkpoint records, checked against the length it was trained at
    (`trained_frames`, written by the training run): attending further is an error, unless the
    settings opt in with `attend_beyond_trained` (then a warning)."""
    try:
        st = StreamingConfig(**streaming)
    except ValueError as exc:  # pydantic's ValidationError keeps the validator's own error in ctx
        errors = exc.errors() if hasattr(exc, "errors") else []
        cause = next(
            (e["ctx"]["error"] for e in errors if isinstance(e.get("ctx", {}).get("error"), TrainedRangeError)), None
        )
        if cause is not None:
            raise CheckpointError(f"checkpoint {root}: {cause}") from None
        raise CheckpointError(f"checkpoint {root}: invalid streaming settings in {STREAMING_CONFIG}: {exc}") from None
    warn_beyond_trained(st, f"checkpoint {root}")
    return st


def _folder_id(root: Path) -> str:
    h = hashlib.sha256()
    for cfg in sorted(root.glob("*/config.json")):
        h.update(cfg.read_bytes())
    return f"{root.name}-{h.hexdigest()[:12]}"


def load_checkpoint(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    parts: frozenset[str] = ALL_PARTS,
) -> Components:
    root = Path(path)
    preset, checkpoint_id = read_preset(root)
    dit = vae = text = None
    if "dit" in parts:
        dit = InContextWanDiT.from_pretrained(root / "transformer", dtype=dtype).to(device).eval()
    if "vae" in parts:
        vae = VideoVAE.from_pretrained(root / "vae", device=device, dtype=dtype)
    if "text_encoder" in parts:
        text = TextEncoder.from_pretrained(
            root / "text_encoder",
            root / "tokenizer",
            max_length=preset.text_encoder.max_length,
            device=device,
            dtype=dtype,
        )
    return Components(preset, dit, vae, text, checkpoint_id=checkpoint_id)
