"""Export a training save to the checkpoint folder the services load (`fashionchameleon generate
--checkpoint DIR`): diffusers layout via `shared.models.checkpoint.save_checkpoint`, with the
trained transformer (LoRA merged, diffusers' keys exactly) and the VAE + text encoder of the
stage's model source, plus `training.json` describing where the weights came from."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from shared.models.checkpoint import save_checkpoint
from shared.models.dit import InContextWanDiT
from shared.models.presets import Preset

from .checkpointing import load_model_weights, resolve_save
from .models import (
    apply_finetune,
    load_components,
    load_dit,
    merged_state_dict,
    source_preset,
)
from .trainer import read_run_info

# Which model of a stage's save is the one to serve.
SERVED_MODEL = {"teacher": "model", "teacher_forcing": "model", "dmd": "generator"}


def trained_preset(preset: Preset, clip_latent_frames: int, recipe: str) -> Preset:
    """The preset with the length this run trained at recorded (`streaming.trained_frames`: the
    clip plus cond). Streaming settings that attend further cannot fit what was trained; a recipe
    whose clips are shorter than any valid stream (the CPU smoke recipe `tiny`) exports with the
    explicit opt-in `attend_beyond_trained`, which the loader warns about."""
    st = preset.streaming
    trained = st.cond_frames + clip_latent_frames
    if st.attended_frames <= trained:
        return preset.with_streaming(trained_frames=trained, attend_beyond_trained=False)
    warnings.warn(
        f"recipe {recipe!r} trained on {trained} latent frames (cond {st.cond_frames} + clip {clip_latent_frames}) "
        f"but preset {preset.name!r} streams {st.attended_frames}; the export is marked attend_beyond_trained",
        UserWarning,
        stacklevel=2,
    )
    return preset.with_streaming(trained_frames=trained, attend_beyond_trained=True)


def export(from_dir: str | Path, out_dir: str | Path) -> dict:
    """Write the checkpoint folder; returns a summary (stage, step, checkpoint id, path)."""
    run_dir, step_dir = resolve_save(from_dir)
    stage, recipe = read_run_info(run_dir)
    trainer = json.loads((step_dir / "trainer.json").read_text())
    cfg = recipe.stage(stage)
    source = cfg.generator if stage == "dmd" else cfg.model
    dit = load_dit(source)
    if stage != "dmd":
        apply_finetune(dit, cfg.finetune)  # LoRA adapters must exist to receive their weights
    load_model_weights(step_dir, SERVED_MODEL[stage], dit)
    preset = trained_preset(source_preset(source), cfg.data.latent_frames, recipe.name)
    plain = InContextWanDiT.build(preset.dit)
    plain.transformer.load_state_dict(merged_state_dict(dit), strict=True)
    components = load_components(source, frozenset({"vae", "text_encoder"}))
    components.dit = plain.eval()
    components.preset = preset
    components.checkpoint_id = f"{recipe.name}-{stage}-step{trainer['step']}"
    out = save_checkpoint(components, out_dir)
    summary = {
        "path": str(out),
        "checkpoint_id": components.checkpoint_id,
        "stage": stage,
        "step": trainer["step"],
        "recipe": recipe.name,
        "from": str(step_dir),
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
