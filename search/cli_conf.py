"""What the ``qkv`` command line knows of a command's config without composing it: its
groups and their options, its settings and their comments. Light on purpose (YAML only,
no torch, Lightning or Hydra), so ``--help`` and a mistyped name answer at once."""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import re

import yaml

from qkvsearch.search.base.env import CONFIG_DIR_FLAGS, VALUE_FLAGS

CONF_DIR = pathlib.Path(__file__).resolve().parent.parent / "conf"
#: The primary config of each command.
PRIMARY = {"sweep": "sweep", "train": "train", "export": "export", "dashboard": "dashboard", "report": "report",
           "space": "space_show", "storage-proxy": "storage_proxy"}


class UnknownName(ValueError):
    """An override names a setting, group or option the command does not have (raised
    here, not as QkvError, whose module would import torch)."""


@dataclasses.dataclass(frozen=True)
class CommandConf:
    """A command's config groups (with their default and options) and its settings."""

    groups: dict[str, tuple[str, list[str]]]
    settings: dict[str, str]  # key -> its comment in the YAML

    @classmethod
    def of(cls, command: str) -> CommandConf:
        path = CONF_DIR / f"{PRIMARY[command]}.yaml"
        data = yaml.safe_load(path.read_text()) or {}
        groups, files = {}, [path]
        for entry in data.get("defaults", []):
            if isinstance(entry, dict):
                ((group, default),) = entry.items()
                if not group.startswith("override "):
                    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
                    groups[group] = (str(default), options)
            elif isinstance(entry, str) and (CONF_DIR / f"{entry}.yaml").is_file():  # shared settings (_qkv)
                files.append(CONF_DIR / f"{entry}.yaml")
        settings = {}
        for line in (line for file in files for line in file.read_text().splitlines()):
            match = re.match(r"^([A-Za-z_]\w*):(.*?)(?:\s#\s*(.*))?$", line)
            if match and match.group(1) not in ("defaults", "hydra"):
                settings[match.group(1)] = (match.group(3) or "").strip()
        return cls(groups, settings)

    def help(self, command: str, summary: str) -> str:
        """The command's help: its groups with their options, its settings with their comments."""
        width = max(map(len, [*self.groups, *self.settings]), default=8)
        lines = [f"qkv {command}: {summary}", "", f"usage: qkv {command} [GROUP=OPTION] [KEY=VALUE] [GROUP.KEY=VALUE] ...", "",
                 "config groups (default first):"]
        for group, (default, options) in self.groups.items():
            rest = [o for o in options if o != default]
            lines.append(f"  {group:<{width}}  {default}" + (f" | {' | '.join(rest)}" if rest else ""))
        lines += ["", "settings:"]
        lines += [f"  {key:<{width}}  {comment}".rstrip() for key, comment in self.settings.items()]
        lines += ["", f"`qkv {command} --cfg job` prints the composed config; `-m` runs a multirun over comma lists;",
                  "`--hydra-help` shows Hydra's own flags."]
        return "\n".join(lines)

    def check(self, args: list[str]) -> None:
        """Refuses an override whose setting, group or option does not exist, suggesting
        the close name (before Hydra's own hint, ``+key=value``, silently adds a new key).

        Raises:
            UnknownName: naming the key or option and what is valid.
        """
        extra_conf = any(a.split("=")[0] in CONFIG_DIR_FLAGS for a in args)
        skip = False
        for arg in args:
            if skip:
                skip = False
                continue
            if arg in VALUE_FLAGS:
                skip = True
                continue
            if arg.startswith(("-", "+", "~")) or "=" not in arg:
                continue
            key, value = arg.split("=", 1)
            top = key.split(".")[0]
            if top.startswith("hydra") or "/" in top:
                continue
            known = [*self.groups, *self.settings]
            if top not in known:
                raise UnknownName(f"unknown setting {key!r}{suggest(top, known)}; settings: {', '.join(known)}")
            if key in self.groups and not extra_conf and value not in ("null", "") and not re.search(r"[,()\[\]]", value):
                options = self.groups[key][1]
                if value not in options:
                    raise UnknownName(f"{key}={value}: no option {value!r}{suggest(value, options)}; options: {', '.join(options)}")


def suggest(name: str, known: list[str]) -> str:
    """`` (did you mean 'sweep'?)`` for a close name in ``known``, else nothing."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


#: SLURM launchers that run one worker per job, where ``workers=N`` becomes one job array
ARRAY_LAUNCHERS = ("slurm_gpu", "submitit_slurm")


def slurm_array(args: list[str]) -> tuple[list[str], str | None]:
    """``qkv sweep hydra/launcher=slurm_gpu workers=N``: one SLURM job array of N tasks, one
    worker each (Hydra's submitit launcher submits a multirun's jobs as one array), instead
    of one job running N workers. Rewritten here as the multirun ``worker_index=range(0,N)
    workers=1``; returns the arguments and the line that says so (None: left as they are).
    With ``worker_index`` given, or the node preset (``slurm_node``: ``workers`` counts a
    node's workers), nothing changes."""
    launcher = next((a.split("=", 1)[1] for a in args if a.startswith("hydra/launcher=")), None)
    workers = [a for a in args if a.startswith("workers=")]
    if launcher not in ARRAY_LAUNCHERS or len(workers) != 1 or any(a.startswith("worker_index=") for a in args):
        return args, None
    value = workers[0].split("=", 1)[1]
    if not value.isdigit() or int(value) < 2:
        return args, None
    count = int(value)
    # `--cfg job` (Hydra prints one job's config, never a multirun's): the first task's
    shown = any(a in ("--cfg", "-c", "--info", "-i") or a.startswith(("--cfg=", "--info=")) for a in args)
    out = [] if shown else ["-m"]
    for arg in args:  # in place: Hydra reads the overrides as one run of arguments
        if arg == workers[0]:
            out += ["workers=1", "worker_index=0" if shown else f"worker_index=range(0,{count})"]
        elif arg not in ("-m", "--multirun"):
            out.append(arg)
    return out, f"qkv sweep: workers={count} on SLURM: one job array of {count} tasks, one worker each" + (
        " (the first task's config)" if shown else "")
