"""The README's promises: its first two commands exist, its model example runs."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_readme_opens_with_the_sweep_and_test_commands_and_make_has_them():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make sweep", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^sweep: setup\n\t\$\(BIN\)/qkv sweep", makefile, re.M)
    assert re.search(r"^test: setup\n\t\$\(BIN\)/python -m pytest", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_model_example_runs_as_written():
    code = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "ArchConfig.from_dict" in b)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README, not config
    assert tuple(namespace["logits"].shape) == (2, 64, 128)
    assert len(namespace["weights"]) == 4
