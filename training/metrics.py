"""Metrics: a JSONL log (always), TensorBoard event files (when `tensorboard` is installed and
enabled) and a tqdm progress bar, all on rank 0 only."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from tqdm import tqdm

TENSORBOARD_AVAILABLE = importlib.util.find_spec("tensorboard") is not None


class MetricLogger:
    def __init__(
        self, run_dir: str | Path, enabled: bool, tensorboard: bool, progress: bool, total: int, initial: int = 0
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate(initial)
        if tensorboard and TENSORBOARD_AVAILABLE:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if progress:
            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc=Path(run_dir).name)

    def _truncate(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint (they are about to be redone)."""
        if self.path.exists():
            keep = [row for row in read_metrics(self.path.parent) if row["step"] < step]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in keep))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), step)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{float(v):.4g}" for k, v in values.items() if "loss" in k})

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
