"""``qkv``: one command, a subcommand per job; each subcommand is a Hydra app."""

from __future__ import annotations

import importlib
import os
import signal
import sys

from qkvsearch.search.base import signals
from qkvsearch.search.base.errors import Interrupted, StorageUnreachable

COMMANDS = {
    "sweep": ("qkvsearch.search.commands.sweep:main", "search architectures: an Optuna study of Lightning-trained trials"),
    "train": ("qkvsearch.search.commands.apps:train", "train one architecture (a config file or a study's trial)"),
    "export": ("qkvsearch.search.commands.apps:export", "write a trial as a standalone PyTorch module folder, checked without qkvsearch"),
    "dashboard": ("qkvsearch.search.commands.apps:dashboard", "serve optuna-dashboard on the sweep's storage (127.0.0.1 by default)"),
    "report": ("qkvsearch.search.commands.apps:report", "write a self-contained HTML report of a study"),
    "storage-proxy": ("qkvsearch.search.commands.apps:storage_proxy",
                      "serve a sweep's PostgreSQL database to storage=grpc workers (Optuna's gRPC proxy, 127.0.0.1 by default)"),
    "space": ("qkvsearch.search.commands.apps:space", "`qkv space show space=NAME`: a space's parameters and how many samples are feasible"),
}

USAGE = """usage: qkv COMMAND [hydra overrides...]

commands:
{commands}

Every command is a Hydra app: `qkv COMMAND --help` shows its config groups and
settings, `qkv COMMAND --cfg job` prints the composed config, KEY=VALUE overrides it.
"""


def usage() -> str:
    width = max(map(len, COMMANDS))
    return USAGE.format(commands="\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()))


def config_error(error: Exception) -> str | None:
    """The one-line message for a config file or override Hydra could not read: YAML that
    does not parse or carries a tag (``!!python/...``: config files are data, never objects),
    a config group option that does not exist, an override that does not parse. None for
    anything else, which is a bug and keeps its traceback."""
    import yaml
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else "a config file"
        what = " ".join(part for part in (error.context, error.problem) if part)
        if isinstance(error, yaml.constructor.ConstructorError):
            what += " (tags are not allowed in config files: write plain values)"
        return f"{where}: {what}"
    if isinstance(error, (ConfigCompositionException, MissingConfigException, OverrideParseException)):
        return str(error).strip() or type(error).__name__
    return None


def main(argv: list[str] | None = None) -> None:
    """Dispatches ``qkv COMMAND ...`` to the command's Hydra app."""
    # Ctrl-C (even where a parent shell ignored SIGINT) and a scheduler's SIGTERM stop a
    # command the same way: a sweep records its running trial as failed and can resume.
    signal.signal(signal.SIGINT, signals.on_signal)
    signal.signal(signal.SIGTERM, signals.on_signal)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command = argv[0]
    from qkvsearch.search.cli_conf import CommandConf, slurm_array, suggest

    if command not in COMMANDS:
        hint = suggest(command, list(COMMANDS))
        print(f"qkv: unknown command {command!r}{hint}; available: {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    # Idle OpenMP threads sleep instead of spinning, so workers and other programs sharing the
    # cores do not stall each other (set before torch is imported; a user's setting wins).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from qkvsearch.search.base.env import die_with_parent

    die_with_parent()  # an extra worker of `qkv sweep workers=N` ends with the process that started it
    rest = argv[1:]
    if command == "space" and rest[:1] == ["show"]:
        rest = rest[1:]
    conf = CommandConf.of(command)
    if any(a in ("-h", "--help") for a in rest):  # answered from the YAML: no torch, no Lightning
        print(conf.help(command, COMMANDS[command][1]))
        return
    if command == "sweep":
        rest, note = slurm_array(rest)
        if note:
            print(note, flush=True)
    try:
        conf.check(rest)
    except ValueError as error:
        print(f"qkv {command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.argv = [f"qkv {command}", *rest]
    # Hydra re-raises what goes wrong while it composes the config (instead of printing
    # a traceback of its own internals), so a broken config file ends as one line below.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        module, app = COMMANDS[command][0].split(":")
        getattr(importlib.import_module(module), app)()
    except Exception as error:
        message = config_error(error)
        if message is None or os.environ.get("QKV_DEBUG"):
            raise
        print(f"qkv {command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except StorageUnreachable as error:
        print(f"qkv {command}: error: {error}", file=sys.stderr)
        raise SystemExit(75) from None  # EX_TEMPFAIL: run it again once the storage is back
    except (Interrupted, KeyboardInterrupt) as error:
        # one line, not a traceback; 128 + the signal's number, as a shell reports it
        signum = getattr(error, "signum", signal.SIGINT)
        print(f"qkv {command}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        raise SystemExit(128 + signum) from None


if __name__ == "__main__":
    main()
