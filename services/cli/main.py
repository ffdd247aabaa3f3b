"""The `fashionchameleon` console script: assembles the command groups, importing only the one that runs.

Each group lives next to its code and exposes `register(subparsers)`; its parser sets `run`, a
function `(args) -> exit status`. `GROUPS` names every group's module and the help line the
top-level `--help` shows, so `fashionchameleon --help` and usage errors import no group (and
so neither torch nor diffusers). Bad input surfaces as `CliError` and is reported here as one
`error: ...` line on stderr with exit status 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from shared.cli import USAGE_ERROR, CliError, Parser, quiet_libraries

# command -> (module whose `register` adds it, its line in the top-level help), in help order.
# tests/unit/test_layers.py checks these lines against what each module registers.
GROUPS: dict[str, tuple[str, str]] = {
    "generate": ("services.cli.generate", "generate a try-on clip (MP4)"),
    "checkpoint": ("services.cli.checkpoint", "create or inspect checkpoint folders"),
    "presets": ("services.cli.presets", "list model presets with token and KV-cache sizes"),
    "up": ("services.cli.serve", "start the embedded default service suite and serve until interrupted"),
    "demo": ("services.cli.serve", "open a session, switch garment twice, save the MP4, print latencies"),
    "batch": ("services.jobs.cli", "submit and follow batch clip jobs (manifest.jsonl)"),
    "train": ("training.cli", "training: preprocess, teacher, teacher-forcing, dmd, export, toy, fast-decoder"),
    "curate": ("training.curation.cli", "curate training triplets from raw videos (Ray Data pipeline, paper App. A)"),
    "eval": ("services.eval.cli", "benchmark a model: metrics, VLM judge, reports, comparisons"),
}


def build_parser(command: str | None = None) -> Parser:
    """The top-level parser; only `command`'s group (if any) is imported and fully registered,
    every other command is a placeholder with its help line."""
    parser = Parser(
        prog="fashionchameleon",
        description="FashionChameleon: real-time garment try-on video (streaming in-context Wan2.2 DiT).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    wanted = GROUPS[command][0] if command in GROUPS else None
    for name, (module, help_line) in GROUPS.items():
        if module != wanted:
            sub.add_parser(name, help=help_line)
        elif name not in sub.choices:  # a module may register several commands (serve: up, demo)
            importlib.import_module(module).register(sub)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named in `argv`: its first argument that is not an option (the top-level
    options take no values)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(_command(argv))
        args = parser.parse_args(argv)
        if not args.verbose:
            quiet_libraries()
        return args.run(args)
    except CliError as e:
        message = " ".join(str(e).split())  # always one line
        print(f"error: {message}", file=sys.stderr)
        return USAGE_ERROR
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
