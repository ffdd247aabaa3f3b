"""Distributed checkpoints with exact resume, and export to the serving checkpoint layout.

A run folder:

    run.json                        stage, recipe (JSON) and world size of the run
    metrics.jsonl, tensorboard/     logs
    checkpoints/step-0000100/       one torch.distributed.checkpoint (DCP) save:
        *.distcp, .metadata         models and optimizers, sharded as trained (FSDP or not)
        trainer.json                step, data-stream position, counters (identical on all ranks)
        rng-rank00000.pt            torch CPU (+ CUDA) RNG state of each rank
    checkpoints/latest              name of the newest complete save

A save is written to `step-N.partial` and renamed once every rank has finished, so `latest`
never points at a half-written checkpoint. DCP reshards on load, so a run may resume on another
world size (model and optimizer exactly; the per-rank RNG then restarts from the saved rank 0).
Training randomness is keyed by step and sample (`training.flow`), so the RNG files matter only
for code that draws from torch's global generators.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .parallel import DistInfo

LATEST = "latest"


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


class CheckpointManager:
    def __init__(self, run_dir: str | Path, info: DistInfo, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.info = info
        self.keep = keep

    def latest(self) -> Path | None:
        marker = self.root / LATEST
        if not marker.exists():
            return None
        path = self.root / marker.read_text().strip()
        return path if path.is_dir() else None

    @staticmethod
    def _state(models: dict[str, nn.Module], optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]]) -> dict:
        state = {f"model.{k}": get_model_state_dict(m) for k, m in models.items()}
        state.update({f"optim.{k}": get_optimizer_state_dict(m, o) for k, (m, o) in optimizers.items()})
        return state

    def save(self, step: int, models: dict[str, nn.Module], optimizers: dict, trainer_state: dict) -> Path:
        final = self.root / step_dir_name(step)
        partial = final.with_name(final.name + ".partial")
        if self.info.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.info.barrier()
        with _quiet_single_process():
            dcp.save(self._state(models, optimizers), checkpoint_id=str(partial))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and self.info.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.info.device)
        torch.save(rng, partial / f"rng-rank{self.info.rank:05d}.pt")
        if self.info.is_main:
            (partial / "trainer.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2) + "\n")
        self.info.barrier()
        if self.info.is_main:
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            (self.root / LATEST).write_text(final.name + "\n")
            self._prune()
        self.info.barrier()
        return final

    def _prune(self) -> None:
        saves = sorted(p for p in self.root.glob("step-*") if p.is_dir() and not p.name.endswith(".partial"))
        for old in saves[: max(0, len(saves) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, models: dict[str, nn.Module], optimizers: dict) -> dict:
        """Load models and optimizers in place; returns trainer.json's content."""
        state = self._state(models, optimizers)
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path))
        for k, m in models.items():
            set_model_state_dict(m, state[f"model.{k}"])
        for k, (m, o) in optimizers.items():
            set_optimizer_state_dict(m, o, state[f"optim.{k}"])
        rng_file = path / f"rng-rank{self.info.rank:05d}.pt"
        rng = torch.load(rng_file if rng_file.exists() else path / "rng-rank00000.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.info.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.info.device)
        return json.loads((path / "trainer.json").read_text())


def load_model_weights(path: Path, key: str, model: nn.Module) -> None:
    """Only the weights of one model (`key`, e.g. "model" or "generator") from a DCP save, into a
    plain (unsharded) module: what export and evaluation need."""
    state = {f"model.{key}": get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state[f"model.{key}"], options=StateDictOptions(full_state_dict=True))


def resolve_save(path: str | Path) -> tuple[Path, Path]:
    """A run folder (its latest save) or a step folder -> (run folder, step folder)."""
    p = Path(path)
    if (p / "trainer.json").is_file():
        return p.parent.parent, p
    marker = p / "checkpoints" / LATEST
    if marker.is_file():
        return p, p / "checkpoints" / marker.read_text().strip()
    raise FileNotFoundError(f"{p} is neither a training run with a checkpoint nor a checkpoint step folder")
