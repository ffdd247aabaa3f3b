"""Training-side model plumbing around the one DiT (`shared.models.dit.InContextWanDiT`).

* `TrainDiT` is `InContextWanDiT` with one change of dispatch: each block's math (the inherited
  `_block`) is invoked through a callable stored on the block module, `block.in_context_forward`.
  `InContextWanDiT` runs block math without calling the block module, so FSDP2's per-block hooks
  would never fire; with the callable on the block, `parallel.shard_model` registers it with
  `register_fsdp_forward_method` and every block all-gathers / frees its own parameters.
  The math, parameters and state-dict keys are exactly the base class's.
* `load_dit` builds it from a `ModelSource` (checkpoint folder or random preset weights).
* `apply_finetune` selects trainable parameters: full, attention-only or LoRA (peft).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
from torch import nn

from shared.models.checkpoint import build_random, load_checkpoint, read_preset
from shared.models.dit import InContextWanDiT
from shared.models.presets import Preset, get_preset

from .config import FinetuneConfig, ModelSource

PEFT_AVAILABLE = importlib.util.find_spec("peft") is not None


class TrainDiT(InContextWanDiT):
    """`InContextWanDiT` whose blocks run through `block.in_context_forward` (FSDP-hookable)."""

    def __init__(self, transformer):
        super().__init__(transformer)
        for layer, block in enumerate(transformer.blocks):
            # A plain attribute (not a registered submodule): state-dict keys stay diffusers'.
            block.in_context_forward = functools.partial(self._block_math, layer)

    def _block_math(self, layer, x, text, modulation, attn):
        return super()._block(layer, x, text, modulation, attn)

    def _block(self, layer, x, text, modulation, attn):
        return self.transformer.blocks[layer].in_context_forward(x, text, modulation, attn)

    def text_and_forward(self, latents, timesteps, text_raw, attn):
        """embed_text + forward in one call: [B, Lt, text_dim] encoder output -> flow [B, C, F, h, w]."""
        return self(latents, timesteps, self.embed_text(text_raw), attn)


def source_preset(source: ModelSource) -> Preset:
    if source.checkpoint is None:
        return get_preset(source.preset)
    preset, _ = read_preset(source.checkpoint)
    return preset


def load_dit(source: ModelSource, dtype: torch.dtype = torch.float32) -> TrainDiT:
    """The DiT of a model source, in `dtype` (fp32 master weights for training)."""
    if source.checkpoint is None:
        dit = build_random(
            get_preset(source.preset), seed=source.weights_seed, dtype=dtype, parts=frozenset({"dit"})
        ).dit
    else:
        dit = InContextWanDiT.from_pretrained(Path(source.checkpoint) / "transformer", dtype=dtype)
    return TrainDiT(dit.transformer).train()


def load_components(source: ModelSource, parts: frozenset[str]):
    """VAE / text encoder (or any parts) of a model source, for preprocessing and export."""
    if source.checkpoint is None:
        return build_random(get_preset(source.preset), seed=source.weights_seed, parts=parts)
    return load_checkpoint(source.checkpoint, parts=parts)


# ---- fine-tuning modes -----------------------------------------------------------------------
ATTENTION_PARAM_MARKERS = (".attn1.", ".attn2.")


def apply_finetune(dit: TrainDiT, cfg: FinetuneConfig) -> list[nn.Parameter]:
    """Set requires_grad per mode and return the trainable parameters."""
    if cfg.mode == "full":
        dit.requires_grad_(True)
    elif cfg.mode == "attention":
        for name, p in dit.named_parameters():
            p.requires_grad_(any(m in name for m in ATTENTION_PARAM_MARKERS))
    elif cfg.mode == "lora":
        if not PEFT_AVAILABLE:
            raise RuntimeError("finetune.mode='lora' needs the peft package (the `train` extra)")
        from peft import LoraConfig

        dit.requires_grad_(False)
        targets = [f"attn{i}.{t}" for i in (1, 2) for t in cfg.lora_targets]
        dit.transformer.add_adapter(
            LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets, init_lora_weights=True)
        )
        for name, p in dit.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        raise ValueError(f"unknown finetune mode {cfg.mode!r}")
    params = [p for p in dit.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"finetune mode {cfg.mode!r} left no trainable parameter")
    return params


def merged_state_dict(dit: InContextWanDiT) -> dict[str, torch.Tensor]:
    """The transformer's state dict with any LoRA adapters merged: diffusers' keys exactly."""
    tr = dit.transformer
    if not getattr(tr, "_hf_peft_config_loaded", False):
        return tr.state_dict()
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in tr.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            delta = module.get_delta_weight(module.active_adapters[0])
            out[f"{name}.weight"] = base.weight.detach() + delta.detach().to(base.weight.dtype)
            if base.bias is not None:
                out[f"{name}.bias"] = base.bias.detach()
    for key, value in tr.state_dict().items():
        if "lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        out.setdefault(plain, value)
    return out
