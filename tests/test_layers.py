"""The import layers hold: import-linter's contracts (pyproject.toml) pass on the code, and fail,
naming both modules, when a lower layer imports a higher one."""

from __future__ import annotations

import pathlib
import shutil
import site
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("models", "spaces", "tasks", "search")


def lint_imports(root: pathlib.Path, config: pathlib.Path) -> subprocess.CompletedProcess:
    """lint-imports over the packages found under ``root`` (a folder holding ``qkvsearch/``),
    without the editable install's finder (``-S``), so a copy is read instead of the checkout."""
    path = ":".join([str(root), *site.getsitepackages()])
    return subprocess.run([sys.executable, "-S", "-c", "import sys; from importlinter.cli import lint_imports_command;"
                           " sys.exit(lint_imports_command())", "--config", str(config), "--no-cache"],
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": path}, cwd=root)


def copy_tree(tmp_path: pathlib.Path) -> pathlib.Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / "qkvsearch" / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "conf", tmp_path / "qkvsearch" / "conf")
    return tmp_path


def test_the_contracts_hold_on_the_code(tmp_path):
    result = lint_imports(copy_tree(tmp_path), ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Contracts: 5 kept, 0 broken." in result.stdout


def test_an_import_from_a_lower_layer_up_breaks_a_contract_and_names_both_modules(tmp_path):
    root = copy_tree(tmp_path)
    keys = root / "qkvsearch" / "search" / "base" / "keys.py"
    keys.write_text(keys.read_text() + "\n\ndef _upward():\n    from qkvsearch.search.study import sweep  # noqa\n")
    result = lint_imports(root, ROOT / "pyproject.toml")
    assert result.returncode != 0
    assert "qkvsearch.search.base is not allowed to import qkvsearch.search.study" in result.stdout
    assert "qkvsearch.search.base.keys -> qkvsearch.search.study.sweep" in result.stdout


def test_the_error_base_and_the_cheap_checks_import_no_torch():
    code = ("import sys; import qkvsearch.models.errors, qkvsearch.search.base.settings, qkvsearch.search.base.keys,"
            " qkvsearch.search.cli; print(sorted(m for m in ('torch', 'lightning', 'optuna') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("command", ["sweep", "train", "export", "report", "dashboard", "space", "storage-proxy"])
def test_a_command_composes_its_config_without_importing_torch(command, tmp_path):
    # `--cfg job` (and a config error) answer before the command's module, and torch,
    # Lightning and transformers with it, are imported: well under a second, not ten
    code = ("import sys; from qkvsearch.search.cli import main; main(sys.argv[1:]);"
            " print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, command, "--cfg", "job"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(("args", "message"), [
    (["train"], "give exactly one of arch=PATH.yaml or study_name=NAME"),
    (["export", "study_name=nope"], "study 'nope' not found"),
    (["report", "study_name=nope"], "study 'nope' not found"),
    (["train", "study_name=nope"], "study 'nope' not found"),
    (["dashboard", "run_root=elsewhere"], "no storage at elsewhere/studies.db"),
])
def test_a_missing_study_is_refused_before_the_command_imports_torch(args, message, tmp_path):
    import optuna

    (tmp_path / "runs").mkdir()
    optuna.create_study(study_name="other", storage=f"sqlite:///{tmp_path}/runs/studies.db")
    code = ("import sys\nfrom qkvsearch.search.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as end:\n"
            "    print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules)); raise")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
