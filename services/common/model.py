"""Load the model parts a replica needs from the typed model config."""

from __future__ import annotations

from shared.config import ModelConfig
from shared.runtime.pipeline import Engine


def load_engine(model: ModelConfig, parts: frozenset[str]) -> Engine:
    """An Engine with only `parts` loaded (subset of {"dit", "vae", "text_encoder"})."""
    if model.checkpoint:
        return Engine.from_checkpoint(model.checkpoint, model.engine, parts=parts)
    return Engine.from_preset(model.preset, model.engine, seed=model.weights_seed, parts=parts)
