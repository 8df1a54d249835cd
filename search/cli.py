"""``qkv``: one command, a subcommand per job; each subcommand is a Hydra app."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "sweep": ("search.sweep", "search architectures: an Optuna study of Lightning-trained trials"),
    "train": ("search.train", "train one architecture (a config file or a study's trial)"),
    "export": ("search.export", "write a trial as a standalone PyTorch module folder, checked without qkvsearch"),
    "space": ("search.space_show", "`qkv space show space=NAME`: a space's parameters and how many samples are feasible"),
}

USAGE = """usage: qkv COMMAND [hydra overrides...]

commands:
{commands}

Every command is a Hydra app: `qkv COMMAND --help` shows its config groups,
`qkv COMMAND --cfg job` prints the composed config, KEY=VALUE overrides it.
"""


def usage() -> str:
    width = max(map(len, COMMANDS))
    return USAGE.format(commands="\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()))


def main(argv: list[str] | None = None) -> None:
    """Dispatches ``qkv COMMAND ...`` to the command's Hydra app."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command = argv[0]
    if command not in COMMANDS:
        print(f"qkv: unknown command {command!r}; available: {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[command][0])
    rest = argv[1:]
    if command == "space" and rest[:1] == ["show"]:
        rest = rest[1:]
    sys.argv = [f"qkv {command}", *rest]
    module.main()


if __name__ == "__main__":
    main()
