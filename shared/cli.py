"""What every `fashionchameleon` command group shares: the error type, the parser, JSON output,
engine options and the checks that run before any model is built.

Convention: a group's module (services/cli/*.py, services/eval/cli.py, services/jobs/cli.py,
training/cli.py, training/curation/cli.py) exposes `register(subparsers)`, which adds its
parser and sets `run=<function(args) -> int>` as a default; services/cli/main.py assembles
the groups. Bad user input is raised as `CliError`; `main` prints it as one `error: ...` line
on stderr and exits with status 2. Results go to stdout.

Importing this module loads neither torch nor diffusers (`fashionchameleon --help` and usage
errors stay fast): what needs them imports them when it runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from shared.runtime.config import DTYPE_NAMES, EngineConfig

if TYPE_CHECKING:
    import torch

    from shared.models.presets import Preset

USAGE_ERROR = 2
# The names of shared.models.attention.BACKENDS, spelled out so that building a parser imports
# no torch (tests/unit/test_cli_output.py checks that the two agree).
ATTENTION_BACKENDS = ("math", "sdpa", "flash")


class CliError(Exception):
    """Bad input from the user: reported as one line, exit status 2, no traceback."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse's own `error` prints the usage block and exits)."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see `{self.prog} --help`)")


def print_json(obj: Any) -> None:
    """One JSON object on one line of stdout."""
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


# ---- results: a summary for people, JSON for programs ----------------------------------------
def add_json_argument(p: argparse.ArgumentParser) -> None:
    """`--json` on a command that prints a result (see `emit`)."""
    p.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON, one object per line (the default when stdout is not a terminal)",
    )


def json_wanted(args: argparse.Namespace) -> bool:
    """JSON with --json, or when stdout is a pipe or a file (scripts keep reading what they read);
    a readable summary on a terminal."""
    if getattr(args, "json", False):
        return True
    isatty = getattr(sys.stdout, "isatty", None)
    return not (isatty is not None and isatty())


def emit(args: argparse.Namespace, result: Any, human: Callable[[Any], str]) -> None:
    """Print one result: `print_json(result)` for programs, `human(result)` on a terminal."""
    if json_wanted(args):
        print_json(result)
    else:
        sys.stdout.write(human(result).rstrip("\n") + "\n")
        sys.stdout.flush()


def fmt_value(v: Any) -> str:
    """A value for people: 4 significant digits, '-' for none, lists comma-separated."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt_value(x) for x in v) if v else "-"
    if isinstance(v, Mapping):
        return ", ".join(f"{k} {fmt_value(x)}" for k, x in v.items()) if v else "-"
    return str(v)


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m // 60}:{m % 60:02d}:{sec:02d}" if m >= 60 else f"{m}:{sec:02d} min"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def fmt_count(n: int | None) -> str:
    """1234567 -> '1.23 M'."""
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def format_fields(fields: Mapping[str, Any], indent: int = 2) -> str:
    """`name  value` lines, names aligned; nested mappings become indented blocks. Keys are shown
    with spaces for underscores."""
    if not fields:
        return ""
    width = max(len(str(k)) for k in fields)
    pad = " " * indent
    lines = []
    for k, v in fields.items():
        name = str(k).replace("_", " ")
        if isinstance(v, Mapping) and v and any(isinstance(x, (Mapping, list)) for x in v.values()):
            lines.append(f"{pad}{name}:")
            lines.append(format_fields(v, indent + 2))
        else:
            lines.append(f"{pad}{name.ljust(width)}  {fmt_value(v)}")
    return "\n".join(lines)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], indent: int = 2) -> str:
    """A plain text table of `rows` (one per line) with `columns`; values through `fmt_value`."""
    cells = [[fmt_value(r.get(c)) for c in columns] for r in rows]
    header = [c.replace("_", " ") for c in columns]
    widths = [max(len(x) for x in col) for col in zip(header, *cells)]
    pad = " " * indent
    return "\n".join(pad + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *cells])


def quiet_libraries() -> None:
    """diffusers / transformers warn about dtype casts and draw progress bars on every load and
    save; keep stderr for our own messages."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


# ---- engine options ------------------------------------------------------------------------
def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """--device/--dtype/--attention/--height/--width, shared by commands that run a model."""
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPE_NAMES), help="compute dtype (default: float32)")
    p.add_argument(
        "--attention", default="auto", choices=["auto", *ATTENTION_BACKENDS], help="attention backend (default: auto)"
    )
    p.add_argument("--height", type=int, help="video height in pixels (default: the preset's)")
    p.add_argument("--width", type=int, help="video width in pixels (default: the preset's)")
    p.add_argument(
        "--decoder",
        choices=["vae", "fast"],
        default="vae",
        help="streaming decoder: the checkpoint's VAE (default) or its distilled fast decoder "
        "(<checkpoint>/fast_decoder, `fashionchameleon train fast-decoder`)",
    )


def engine_config(args: argparse.Namespace, preset: Preset, **streaming_overrides: Any) -> EngineConfig:
    """Check the engine options against `preset` (no model built) and return the config."""
    from shared.models.attention import use_attention_backend

    check_device(args.device)
    try:
        with use_attention_backend(args.attention):
            pass
    except ValueError as e:
        raise CliError(str(e)) from None
    if (args.height is None) != (args.width is None):
        raise CliError("--height and --width go together")
    if args.height is not None:
        try:
            preset.check_resolution(args.height, args.width)
        except ValueError as e:
            raise CliError(str(e)) from None
    return EngineConfig(
        device=args.device,
        dtype=args.dtype,
        attention_backend=args.attention,
        height=args.height,
        width=args.width,
        streaming_overrides=streaming_overrides,
        decoder=getattr(args, "decoder", "vae"),
    )


def check_device(name: str) -> torch.device:
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"device {name!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif device.type != "cpu":
        raise CliError(f"device type {device.type!r} is not supported (use cpu or cuda)")
    return device


# ---- input / output checks -----------------------------------------------------------------
def read_image(path: str, what: str):
    """Load and fully decode an image (PIL RGB); any problem becomes a CliError naming `what`."""
    from shared.media.images import ImageError, load_image

    try:
        return load_image(path)
    except ImageError as e:
        detail = str(e) if str(path) in str(e) else f"{path}: {e}"
        raise CliError(f"{what} image {detail}") from None


def check_output_file(path: str | Path) -> Path:
    """Make sure a file can be created at `path` (parents are created); returns the absolute path.

    Probes with a real temporary file, so read-only file systems and missing permissions are
    caught even when running as root.
    """
    out = Path(path).expanduser().absolute()
    if out.is_dir():
        raise CliError(f"output {out} is a directory; give a file name")
    existing = next((p for p in out.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise CliError(f"output folder {out.parent} is not writable: {existing} is a file")
    _probe_writable(out.parent)
    return out


def check_output_folder(path: str | Path, force: bool = False) -> Path:
    """A folder to write a checkpoint into: new or empty (or anything with `force`) and writable."""
    out = Path(path).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise CliError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CliError(f"output folder {out} is not empty (use --force to write into it)")
    existing = next((p for p in out.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise CliError(f"output folder {out} is not writable: {existing} is a file")
    _probe_writable(out)
    return out


def _probe_writable(folder: Path) -> None:
    """Create `folder` (and parents) and a temporary file in it, or raise CliError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fashionchameleon-", suffix=".probe"):
            pass
    except OSError as e:
        raise CliError(f"output folder {folder} is not writable: {e.strerror or e}") from None


def shipped_checkpoint() -> str:
    """The checkpoint used when neither --checkpoint nor --preset is given (the shipped toy model,
    or $FASHIONCHAMELEON_DEFAULT_CHECKPOINT), or a one-line CLI error naming it when it is missing."""
    from shared.models.checkpoint import CheckpointError, default_checkpoint

    try:
        return str(default_checkpoint())
    except CheckpointError as e:
        raise CliError(str(e)) from None
