"""The `moemesh` command line: one subcommand per entry of `COMMANDS`.

To add a subcommand, write `_<name>_args(parser)` (its arguments) and `_<name>(args) -> int` (the work, returning the
exit status) and register both in `COMMANDS`. Errors a user can fix (ValueError, incl. config and checkpoint errors,
and OSError) print one line and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NamedTuple

EXIT_USAGE = 2


class Command(NamedTuple):
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---- init-model ----------------------------------------------------------------------------------------------------
def _init_model_args(p: argparse.ArgumentParser) -> None:
    from moemesh.kernels.tiny import DTYPES

    p.add_argument("name", choices=["tiny"], help="built-in model to write")
    p.add_argument("--out", required=True, help="directory to write the checkpoint into")
    p.add_argument("--dtype", choices=DTYPES, default="v4",
                   help="v4: FP8/FP4 weights as DeepSeek-V4 releases ship them (default); float32/bfloat16: "
                        "unquantized")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out directory")


def _init_model(args: argparse.Namespace) -> int:
    from moemesh.kernels.tiny import write_tiny_model

    out = write_tiny_model(args.out, dtype=args.dtype, force=args.force)
    print(f"wrote the {args.name} model ({args.dtype}) to {out}")
    return 0


COMMANDS: dict[str, Command] = {
    "init-model": Command("write a built-in model checkpoint (config, weights, tokenizer)", _init_model_args,
                          _init_model),
}


# ---- entry point ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moemesh", description="Serve DeepSeek-V4-class MoE models on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        cmd.add_args(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `moemesh ARGS`; returns the exit status (the console script exits with it)."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except (ValueError, OSError) as e:
        print(f"moemesh {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
