"""The README's "Use with Hugging Face" block runs as written."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

pytest.importorskip("transformers", reason="memcore.hf needs transformers (memcore[hf])")

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_hugging_face_block_runs(tmp_path, monkeypatch):
    section = README.read_text().split("## Use with Hugging Face", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)  # the block saves a model into the working directory
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert scope["new"].shape == (2, 24) and torch.equal(scope["new"][:, :8], scope["ids"][:, :8])
    assert scope["loss"].item() > 0
    assert (tmp_path / "memcore-jamba" / "model.safetensors").is_file()
    a, b = dict(scope["model"].named_parameters()), dict(scope["same"].named_parameters())
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
