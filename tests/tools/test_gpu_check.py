"""tools/gpu_check.sh on a machine without a GPU: its dry run writes a valid report with every
stage, and the parts it is made of (the report's schema, the test-result plugin, the list of
GPU-only tests, the benchmark's --json, the setup's guard) do what the GPU run relies on."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks import gpu, gpu_check, gpu_setup, harness

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["setup", "env", "tests_gpu", "bench_scan", "bench_attention", "bench_layer",
          "tests_kernels"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The script's dry run: (exit code, output, output folder)."""
    out = tmp_path_factory.mktemp("gpu_check_out")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "MEMCORE_KERNELS_POISON", "OUT")}
    env.update(PYTHON=sys.executable, MEMCORE_GPU_CHECK_BUDGET_S="300")
    run = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", str(out)],
                         cwd="/", env=env, capture_output=True, text=True, timeout=600)
    return run.returncode, run.stdout + run.stderr, out


def test_dry_run_report(dry_run):
    rc, said, out = dry_run
    assert rc == 0, said[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files) and len(files) <= 8, files
    report = json.loads((out / "gpu_check.json").read_text())
    gpu_check.check_report(report)
    assert report["dry_run"] is True and report["ok"] is True
    assert list(report["stages"]) == STAGES
    for name, stage in report["stages"].items():
        assert stage["log"] in files, name
        assert stage["rc"] is not None and stage["seconds"] is not None, name
    cuda = torch.cuda.is_available()
    setup = report["stages"]["setup"]["details"]
    assert setup["ok"] and setup["pythonpath"] == [] and setup["run_root"] == str(ROOT)
    # the fallback was built and imports as the installed package, entry points included
    copy = setup["copy"]
    assert copy["serves"] and copy["probe"]["memcore"].startswith(copy["root"])
    assert "torch" in copy["probe"]["backends"]
    env = report["stages"]["env"]["details"]
    assert env["cuda_available"] is cuda and env["settings"]["TRITON_INTERPRET"] is None
    assert env["packages"]["torch"] == torch.__version__
    for name in ("bench_scan", "bench_attention", "bench_layer"):
        figures = report["stages"][name]["figures"]
        section = name.removeprefix("bench_")
        assert list(figures["sections"]) == [section]
        if not cuda:
            assert report["stages"][name]["status"] == gpu.NO_CUDA
            assert figures["sections"][section]["status"] == gpu.NO_CUDA
    kernels = report["stages"]["tests_kernels"]["tests"]
    assert kernels["collected"] > 50 and sum(kernels["counts"].values()) == 0
    if not cuda:
        # every GPU-only test ran and skipped, saying it needs a GPU
        tests = report["stages"]["tests_gpu"]["tests"]
        assert tests["collected"] >= 10
        assert tests["counts"]["skipped"] == tests["collected"]
        assert all("GPU" in why or "CUDA" in why for why in tests["skip_reasons"]), tests
        assert report["stages"]["tests_gpu"]["status"] == gpu_check.NO_CUDA


def test_gpu_tests_are_found_by_their_markers(tmp_path):
    listed = gpu_check.gpu_tests(str(ROOT))
    for known in ("tests/selective_scan/test_triton.py::test_gpu_realistic",
                  "tests/windowed_readout/test_pallas.py::test_compiled_realistic",
                  "tests/properties/test_torch_implementation.py::test_cuda_tensor_uses_kernels"):
        assert known in listed
    (tmp_path / "tests" / "x").mkdir(parents=True)
    (tmp_path / "tests" / "x" / "test_a.py").write_text(textwrap.dedent("""
        import pytest, torch
        from kcheck import gpu

        @gpu
        def test_one(): pass

        @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
        def test_two(): pass

        @pytest.mark.skipif(sys.platform == "win32", reason="not a GPU condition")
        def test_three(): pass

        def test_four(): pass

        class TestGroup:
            @gpu
            def test_five(self): pass
    """))
    assert gpu_check.gpu_tests(str(tmp_path)) == [
        "tests/x/test_a.py::test_one", "tests/x/test_a.py::test_two",
        "tests/x/test_a.py::TestGroup::test_five"]
    files = gpu_check.kernel_tests(str(ROOT))
    assert "tests/selective_scan/test_triton.py" in files
    assert "tests/layers/test_jax_pallas.py" in files
    assert not [f for f in files if f.startswith(gpu_check.AOT_TESTS)]
    assert files.index("tests/selective_scan/test_triton.py") < files.index(
        "tests/selective_scan/test_pallas.py")


def test_plugin_records_each_outcome(tmp_path):
    (tmp_path / "test_cases.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.fixture
        def broken():
            raise RuntimeError("fixture broke")

        def test_pass(): pass
        def test_fail(): assert 1 == 2, "one is not two"
        def test_skip(): pytest.skip("no device here")
        def test_error(broken): pass

        @pytest.mark.xfail(reason="known")
        def test_xfail(): assert False
    """))
    results = tmp_path / "results.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{gpu_check.RESULTS_ENV: str(results)})
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                    "benchmarks.gpu_check", "test_cases.py"], cwd=tmp_path, env=env,
                   capture_output=True, timeout=120)
    got = gpu_check.summarize_tests(str(results))
    assert got["collected"] == 5
    assert got["counts"] == dict(passed=1, failed=1, error=1, skipped=1, xfailed=1, xpassed=0)
    assert got["skip_reasons"] == {"no device here": 1}
    failures = {f["nodeid"].split("::")[1]: f for f in got["failures"]}
    assert set(failures) == {"test_fail", "test_error"}
    assert "one is not two" in failures["test_fail"]["message"]
    assert failures["test_error"]["when"] == "setup"
    assert "fixture broke" in failures["test_error"]["message"]


def test_stage_status():
    counts = dict.fromkeys(gpu_check.OUTCOMES, 0)
    tests = {"counts": dict(counts, failed=2, error=1)}
    assert gpu_check.stage_status("tests", 124, 90, None, None) == "timed out after 90 s"
    assert gpu_check.stage_status("bench", 137, 60, None, None) == "timed out after 60 s"
    assert gpu_check.stage_status("tests", 1, 90, tests, None) == (
        "failed (exit 1): 2 failed, 1 errors")
    assert gpu_check.stage_status("tests", 0, 90, {"counts": counts}, "skipped: x") == (
        "skipped: x")
    ran = {"counts": dict(counts, passed=3)}
    assert gpu_check.stage_status("tests", 0, 90, ran, "skipped: x") == "ok"
    assert gpu_check.stage_status("bench", 1, 60, {"status": gpu.NO_CUDA}, None) == gpu.NO_CUDA
    assert gpu_check.stage_status("bench", 1, 60, {"status": "failed: sections ['scan']"},
                                  None) == "failed (exit 1): failed: sections ['scan']"
    assert gpu_check.stage_status("env", 0, 45, {}, None) == "ok"
    assert gpu_check.stage_status("setup", None, None, None, "skipped: no time") == (
        "skipped: no time")


def _report(**stage):
    base = {"kind": "bench", "status": "ok", "rc": 0, "log": "bench.log"}
    return {"schema": gpu_check.SCHEMA, "dry_run": False, "budget_s": 530,
            "stages": {"bench_scan": dict(base, **stage)}}


@pytest.mark.parametrize("bad, field", [
    ({"status": "fine"}, "stages.bench_scan.status"),
    ({"kind": "other"}, "stages.bench_scan.kind"),
    ({"log": "/tmp/x.log"}, "stages.bench_scan.log"),
    ({"rc": "0"}, "stages.bench_scan.rc"),
    ({"figures": {"status": "ok"}}, "stages.bench_scan.figures.sections"),
    ({"kind": "tests", "tests": {"counts": {"passed": 1}}}, "stages.bench_scan.tests.counts"),
])
def test_check_report_names_the_bad_field(bad, field):
    gpu_check.check_report(_report())
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        gpu_check.check_report(_report(**bad))
    with pytest.raises(ValueError, match="schema"):
        gpu_check.check_report(dict(_report(), schema="other/1"))


def test_record_and_finish(tmp_path, capsys):
    report, results = tmp_path / "r.json", tmp_path / "t.jsonl"
    results.write_text('{"collected": 2}\n'
                       '{"nodeid": "a::t1", "when": "call", "outcome": "passed", "seconds": 1}\n'
                       '{"nodeid": "a::t2", "when": "call", "outcome": "failed", "seconds": 2,'
                       ' "message": "boom"}\n')
    assert gpu_check.main(["init", str(report), "--budget", "100"]) == 0
    gpu_check.main(["record", str(report), "--stage", "tests_gpu", "--kind", "tests", "--log",
                    "tests_gpu.log", "--rc", "1", "--limit", "50", "--details", str(results)])
    gpu_check.main(["record", str(report), "--stage", "bench_layer", "--kind", "bench", "--log",
                    "bench_layer.log", "--status", "skipped: no time left"])
    assert gpu_check.main(["finish", str(report)]) == 1  # a stage failed
    got = json.loads(report.read_text())
    assert got["summary"] == {"tests_gpu": "failed (exit 1): 1 failed, 0 errors",
                              "bench_layer": "skipped: no time left"}
    assert got["ok"] is False
    assert got["stages"]["tests_gpu"]["tests"]["failures"][0]["message"] == "boom"
    assert "tests_gpu        failed (exit 1)" in capsys.readouterr().out


def test_write_json_is_strict_and_whole(tmp_path):
    path = tmp_path / "f.json"
    harness.write_json(str(path), {"a": float("nan"), "b": [1.5, float("inf")], 3: "x"})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None], "3": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_benchmark_json_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "b.json"
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        gpu.main(["--only", "scan", "layer", "--json", str(path)])
    got = json.loads(path.read_text())
    assert got["status"] == gpu.NO_CUDA
    assert got["sections"] == {"scan": {"status": gpu.NO_CUDA},
                               "layer": {"status": gpu.NO_CUDA}}


def test_benchmark_json_keeps_going_past_a_failed_section(tmp_path, monkeypatch):
    """The sections themselves need a GPU: stand-ins return figures or fail, and the JSON
    holds both, NaN as null, with the peak bandwidth taken from the device's name."""
    pytest.importorskip("triton", reason="the benchmark imports triton before its sections")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    seen = {}

    def scan(args, peak):
        seen["peak"] = peak
        raise RuntimeError("out of memory")

    monkeypatch.setattr(gpu, "scan_section", scan)
    monkeypatch.setattr(gpu, "attention_section", lambda args: {
        "rows": [{"kernel": "k", "fwd_ms": 1.5, "fwd_speed_vs_reference": math.nan}]})
    path = tmp_path / "b.json"
    with pytest.raises(SystemExit, match=r"sections failed: \['scan'\]"):
        gpu.main(["--only", "scan", "attention", "--json", str(path)])
    got = json.loads(path.read_text())
    assert seen["peak"] == 4800.0 and got["peak_gbps"] == 4800.0
    assert got["device"] == "NVIDIA H200" and got["status"] == "failed: sections ['scan']"
    assert got["sections"]["scan"]["status"].startswith("failed: RuntimeError('out of memory'")
    assert "out of memory" in got["sections"]["scan"]["traceback"]
    att = got["sections"]["attention"]
    assert att["status"] == "ok" and att["seconds"] >= 0
    assert att["rows"] == [{"kernel": "k", "fwd_ms": 1.5, "fwd_speed_vs_reference": None}]


def test_scan_baseline_without_mamba_ssm_is_the_torch_path(monkeypatch):
    """The baseline asks for the torch path by name: under ``auto`` (here forced to the
    kernels) it would time the Triton kernel against itself."""
    pytest.importorskip("triton", reason="the kernel module is replaced, so it must import")
    import memcore.kernels.triton.selective_scan as kernel

    from benchmarks.gpu_selective_scan import torch_path

    def refuse(*a, **k):
        raise AssertionError("the baseline ran the Triton kernel")

    monkeypatch.setattr(kernel, "selective_scan", refuse)
    monkeypatch.setenv("MEMCORE_KERNELS", "triton")
    g = torch.Generator().manual_seed(0)
    inp = dict(u=torch.randn(1, 3, 5, generator=g), delta=torch.randn(1, 3, 5, generator=g),
               A=-torch.rand(3, 2, generator=g) - 0.5, B=torch.randn(1, 2, 5, generator=g),
               C=torch.randn(1, 2, 5, generator=g))
    y = torch_path(inp, dict(delta_softplus=True))()
    assert y.shape == (1, 3, 5) and torch.isfinite(y).all()


def test_setup_guard_says_why_an_editable_install_cannot_work(monkeypatch):
    versions = {"setuptools": None}
    monkeypatch.setattr(gpu_setup, "_version", lambda d: versions.get(d))
    assert gpu_setup.editable_backend() == "setuptools is not installed"
    versions["setuptools"] = "63.2.0"
    assert "predates editable wheels" in gpu_setup.editable_backend()
    versions["setuptools"] = "68.0.0"
    real = gpu_setup.importlib.util.find_spec
    monkeypatch.setattr(gpu_setup.importlib.util, "find_spec",
                        lambda name: None if name == "wheel" else real(name))
    assert "needs the wheel package" in gpu_setup.editable_backend()
    versions["setuptools"] = "70.1.0"
    assert gpu_setup.editable_backend() is None
