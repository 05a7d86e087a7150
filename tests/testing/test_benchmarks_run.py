"""The CPU benchmarks run end to end on tiny shapes and print their tables (their figures are
not checked here: benchmarks are measured side by side, never timed in tests)."""

from __future__ import annotations

import re

import pytest


def test_torch_cpu_benchmark_prints_every_table(capsys):
    pytest.importorskip("torch")
    from benchmarks import torch_cpu

    torch_cpu.main(["--threads", "1", "--lengths", "128", "--repeat", "1", "--layers", "mamba",
                    "--stream", "8", "16", "--steps", "2", "--skip", "mosaic",
                    "--floor-length", "64"])
    out = capsys.readouterr().out
    assert out.startswith("machine: ")
    assert re.search(r"^\| 128 \|", out, re.M), out  # the training row at T=128
    assert re.search(r"^matmul floor at T=64: sgemm [0-9.]+ GFLOP/s at 1 threads", out, re.M), out
    floor = re.search(r"^\| transformer\(None\) \|(.*)$", out, re.M)
    assert floor, out
    gflop, floor_s, time_s, ratio = (float(c) for c in floor.group(1).split("|") if c.strip())
    assert gflop > 0 and abs(time_s / floor_s - ratio) <= 0.01 * ratio
    for name in ("bmojo", "bmojo_f", "mamba"):
        row = re.search(rf"^\| {name} \|(.*)$", out, re.M)
        assert row, f"no streaming row for {name}:\n{out}"
        cells = [c.strip() for c in row.group(1).split("|") if c.strip()]
        assert len(cells) == 8 and cells[-1] == cells[-2], cells  # state bytes constant


def test_matmul_flops_are_linear_in_length_for_mamba():
    """The floor's FLOP count: mamba's projections are linear in T, so twice the length is
    twice the FLOPs (the counter sees forward and backward products)."""
    pytest.importorskip("torch")
    from benchmarks import torch_cpu

    mod = torch_cpu.layer(torch_cpu.specs()["mamba"])
    f1, f2 = (torch_cpu.matmul_flops(mod, T, 1) for T in (64, 128))
    assert f1 > 0 and f2 == 2 * f1


def test_benchmark_entry_point_rejects_unknown_layer(capsys):
    pytest.importorskip("torch")
    from benchmarks import torch_cpu

    with pytest.raises(SystemExit):
        torch_cpu.main(["--layers", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_jax_cpu_benchmark_prints_both_tables(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("equinox")
    from benchmarks import jax_cpu

    jax_cpu.main(["--lengths", "64", "--repeat", "1", "--stream", "16", "--steps", "2",
                  "--layers", "mamba"])
    out = capsys.readouterr().out
    assert out.startswith("machine: ")
    rows = re.findall(r"^\| mamba \|(.*)$", out, re.M)
    assert len(rows) == 2, out  # the forward+backward row and the streaming row
