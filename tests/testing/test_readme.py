"""The README's quickstart runs as written."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_runs(capsys):
    code = _blocks()[0]
    assert "memcore.realize" in code
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert scope["y"].shape == (2, 40, 64)
    assert scope["y_t"].shape == (2, 64)
    assert scope["state"]["pos"] == 41
    assert float(scope["aux"]) > 0


def test_readme_has_the_two_fresh_machine_commands():
    text = README.read_text()
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        after = text.split(marker, 1)[1]
        block = re.search(r"```bash\n(.*?)```", after, flags=re.S).group(1).strip()
        assert block.count("\n") == 0, f"{marker} must be one copy-paste line"
        assert block.startswith("bash tools/setup_env.sh && .venv/bin/")
