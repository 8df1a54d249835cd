"""The README's and docs' promises: their commands run as written, their code runs, their
YAML is the configs', their tables are the registries'."""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README = (ROOT / "README.md").read_text()
QKV = [sys.executable, "-m", "qkvsearch.search.cli"]


def blocks(page: pathlib.Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)


def command_lines(block: str) -> list[str]:
    """A bash block's commands: continuations joined, comments and blank lines dropped."""
    lines = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def qkv_commands() -> list[tuple[str, list[str], dict[str, str]]]:
    """Every ``qkv`` command of a bash block: the page, its arguments, its environment."""
    found = []
    for page in PAGES:
        for block in blocks(page, "bash"):
            for line in command_lines(block):
                words = shlex.split(line)
                env = {}
                while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                    key, value = words.pop(0).split("=", 1)
                    env[key] = value
                if words and words[0] == "qkv":
                    found.append((page.name, words[1:], env))
    return found


def first_job(args: list[str]) -> list[str]:
    """A multirun's first job: ``-m`` dropped and each comma list its first value (Hydra
    prints one job's config, never a sweep's)."""
    if "-m" not in args:
        return args
    out = []
    for arg in args:
        if arg == "-m":
            continue
        key, eq, value = arg.partition("=")
        out.append(f"{key}={value.split(',')[0]}" if eq and "," in value and "[" not in value else arg)
    return out


def test_the_readme_opens_with_the_sweep_and_test_commands_and_make_has_them():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert command_lines(first_block) == ["make sweep", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^sweep: setup\n\t\$\(BIN\)/qkv sweep", makefile, re.M)
    assert re.search(r"^test: setup\n\t\$\(BIN\)/python -m pytest", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_fits_on_a_screen_and_every_page_it_links_exists():
    assert len(README.splitlines()) <= 200
    for link in re.findall(r"\bdocs/[a-z_]+\.(?:md|png)", README):
        assert (ROOT / link).is_file(), link


@pytest.mark.slow
@pytest.mark.parametrize(("page", "args", "env"), qkv_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_qkv_command_of_the_docs_composes_as_written(page, args, env, tmp_path):
    """Each command composes its config with its overrides (an unknown setting, option or
    group would fail here); ``--help`` and ``space show`` run as written."""
    cheap = "--help" in args or args[:2] == ["space", "show"]
    run = args if cheap else [*first_job(args), "--cfg", "job"]
    result = subprocess.run([*QKV, *run], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, **env})
    assert result.returncode == 0, f"{page}: qkv {' '.join(args)}\n{result.stderr[-2000:]}"
    if args[:2] == ["space", "show"]:
        assert re.search(r"feasible: \d+ of \d+ random samples", result.stdout)


def test_the_space_the_readme_shows_whole_is_the_default_space():
    shown = next(b for b in blocks(ROOT / "README.md", "yaml") if b.startswith("name: tiny"))
    assert yaml.safe_load(shown) == yaml.safe_load((ROOT / "conf" / "space" / "tiny.yaml").read_text())


@pytest.mark.slow
def test_the_space_reference_example_loads_and_samples(tmp_path):
    example = next(b for b in blocks(ROOT / "docs" / "spaces.md", "yaml") if "architecture:" in b)
    (tmp_path / "space").mkdir()
    (tmp_path / "space" / "mine.yaml").write_text(example)
    result = subprocess.run([*QKV, "space", "show", "--config-dir", str(tmp_path), "space=mine", "n_samples=20"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    feasible = int(re.search(r"feasible: (\d+) of 20", result.stdout).group(1))
    assert feasible > 0 and "lr" in result.stdout


def test_the_component_table_lists_each_registry_as_it_is():
    from qkvsearch.models import REGISTRIES

    table = (ROOT / "docs" / "models.md").read_text()
    for field, registry in REGISTRIES.items():
        row = re.search(rf"^\| `[a-z_.]*{field}`[^|]*\| `\w+` \| (.*) \|$", table, re.M)
        assert row, field
        ours = [name for name in registry.names() if not name.startswith("test_")]  # the suite's own components
        assert re.findall(r"`(\w+)`", row.group(1)) == ours, field


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python")], ids=lambda p: p.name)
def test_python_in_the_docs_compiles_and_the_self_contained_blocks_run(page, tmp_path):
    for code in blocks(page, "python"):
        compile(code, str(page), "exec")  # every block is valid Python
        if "exports/" in code:
            continue  # reads an export: the README tour runs one
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, f"{page.name}:\n{code}\n{result.stderr[-2000:]}"


@pytest.mark.slow
def test_the_readme_tour_runs_as_written(tmp_path):
    """The tour's commands, in a fresh folder: sweep, dashboard (served, then stopped), report,
    export, and the export loaded without qkvsearch."""
    tour = next(b for b in blocks(ROOT / "README.md", "bash") if "qkv dashboard" in b)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    for line in command_lines(tour):
        words = shlex.split(line)
        if words[0] == "qkv" and words[1] == "dashboard":
            server = subprocess.Popen([*QKV, *words[1:]], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        page = urllib.request.urlopen("http://127.0.0.1:8080/api/studies", timeout=5).read()  # noqa: S310
                        break
                    except OSError:
                        time.sleep(0.5)
                assert b"lm_stdlib-tiny" in page
            finally:
                os.killpg(server.pid, signal.SIGINT)
                server.wait(timeout=30)
            continue
        command = [*QKV, *words[1:]] if words[0] == "qkv" else [sys.executable, *words[1:]]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
        assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
        if words[0] == "python":  # 60 characters written on from the prompt (one token is a character)
            assert len(result.stdout) == 61 and result.stdout.endswith("\n")
    assert (tmp_path / "runs" / "lm_stdlib-tiny-report.html").stat().st_size > 100_000
    assert (tmp_path / "exports" / "first" / "model.safetensors").is_file()
