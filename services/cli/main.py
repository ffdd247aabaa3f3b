"""The `fashionchameleon` console script: wires one module per subcommand.

Each module under `services/cli/` exposes `register(subparsers)`; its parser sets `run`, a
function `(args) -> exit status`. Bad input surfaces as `CliError` and is reported here as one
`error: ...` line on stderr with exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import batch, checkpoint, curate, generate, presets, serve, train
from . import eval as eval_cmd
from .common import USAGE_ERROR, CliError, Parser, quiet_libraries

COMMANDS = (generate, checkpoint, presets, serve, batch, train, curate, eval_cmd)


def build_parser() -> Parser:
    parser = Parser(
        prog="fashionchameleon",
        description="FashionChameleon: real-time garment try-on video (streaming in-context Wan2.2 DiT).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
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
