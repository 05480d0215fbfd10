"""``python -m inductor_flex COMMAND``: the package's command line.

Each command is a module with ``add_parser(subcommands)``, which registers its arguments and
sets ``run(args) -> exit code`` as the parser default; add a command by listing its module.
"""

import argparse
import sys

from . import demo

COMMANDS = (demo,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m inductor_flex",
        description="inductor_flex: FlexAttention as score_mod / mask_mod functions.",
    )
    subcommands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
