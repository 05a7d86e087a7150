"""The report of ``tools/gpu_check.sh``: one JSON file of every figure a GPU run produced.

    python -m benchmarks.gpu_check init REPORT --budget S [--dry-run]
    python -m benchmarks.gpu_check env --json PATH        versions and the device (printed too)
    python -m benchmarks.gpu_check has-cuda ENV_JSON      exit 0 where that run saw a CUDA device
    python -m benchmarks.gpu_check gpu-tests              node ids of the tests that need a GPU
    python -m benchmarks.gpu_check kernel-tests           the Triton and Pallas test files
    python -m benchmarks.gpu_check record REPORT --stage NAME --kind KIND --log FILE [...]
    python -m benchmarks.gpu_check finish REPORT          summary; exit 1 if a stage failed

Loaded into pytest as ``-p benchmarks.gpu_check``, this module is also a plugin that appends
each test's outcome to the file named by ``MEMCORE_GPU_CHECK_RESULTS`` as soon as the test
ends, so a test run stopped by its stage's timeout still counts what it finished.

The report is rewritten whole at each ``record``: it is valid JSON after every stage, even if
the machine is taken back before the script ends. ``check_report`` is its schema.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import glob
import json
import os
import re
import sys
import time

from .harness import write_json

SCHEMA = "memcore.gpu_check/1"
KINDS = ("setup", "env", "tests", "bench")
RESULTS_ENV = "MEMCORE_GPU_CHECK_RESULTS"
NO_CUDA = "skipped: no CUDA device"
# what a stage's status may say
STATUS = re.compile(r"^(ok|skipped: .+|failed \(exit -?\d+\)(: .+)?|timed out after \d+ s)$")
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
# the ahead-of-time compile checks: made for machines without a GPU, run by CI already
AOT_TESTS = "tests/kernels/"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --- which tests ------------------------------------------------------------------------------

def _needs_gpu(decorator: ast.expr) -> bool:
    """``@gpu`` (tests/support's skip marker) or a ``skipif`` on CUDA or a GPU being there."""
    if isinstance(decorator, ast.Name) and decorator.id == "gpu":
        return True
    if isinstance(decorator, ast.Call) and ast.unparse(decorator.func).endswith("skipif"):
        cond = ast.unparse(decorator.args[0]) if decorator.args else ""
        return "cuda.is_available" in cond or "ON_GPU" in cond
    return False


def gpu_tests(root: str = ".") -> list[str]:
    """Node ids of every test that skips without a GPU, found in the test files' source: the
    compiled kernels at realistic sizes, and the CUDA dispatch."""
    found = []
    for path in sorted(glob.glob(os.path.join(root, "tests", "**", "test_*.py"),
                                 recursive=True)):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        scopes = [(node, "") for node in tree.body]
        scopes += [(item, f"{node.name}::") for node in tree.body
                   if isinstance(node, ast.ClassDef) for item in node.body]
        for node, prefix in scopes:
            if (isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                    and node.name.startswith("test") and any(map(_needs_gpu,
                                                                 node.decorator_list))):
                found.append(f"{rel}::{prefix}{node.name}")
    return found


def kernel_tests(root: str = ".") -> list[str]:
    """The Triton test files, then the Pallas ones (their GPU-only tests included), without
    the ahead-of-time compile checks of tests/kernels/."""
    files = []
    for word in ("triton", "pallas"):
        for path in sorted(glob.glob(os.path.join(root, "tests", "**", f"test_*{word}*.py"),
                                     recursive=True)):
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if not rel.startswith(AOT_TESTS) and rel not in files:
                files.append(rel)
    return files


# --- the pytest plugin ------------------------------------------------------------------------

def _emit(record: dict) -> None:
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _outcome(report) -> str | None:
    """The outcome pytest's summary counts for this phase's report, or None for none."""
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    if report.when == "call":
        return report.outcome
    if report.skipped:
        return "skipped"
    return "error" if report.failed else None


def _message(report) -> str:
    rep = report.longrepr
    if isinstance(rep, tuple):  # a skip: (path, line, "Skipped: why")
        return str(rep[2]).removeprefix("Skipped: ")
    crash = getattr(rep, "reprcrash", None)
    if crash is not None:
        return str(crash.message)[:1000]
    return str(rep)[-1000:]


def pytest_collection_finish(session) -> None:
    _emit({"collected": len(session.items)})


def pytest_collectreport(report) -> None:
    if report.failed:
        _emit({"nodeid": report.nodeid, "when": "collect", "outcome": "error",
               "seconds": 0.0, "message": str(report.longrepr)[-1000:]})


def pytest_runtest_logreport(report) -> None:
    outcome = _outcome(report)
    if outcome is None:
        return
    rec = {"nodeid": report.nodeid, "when": report.when, "outcome": outcome,
           "seconds": round(report.duration, 3)}
    if outcome != "passed":
        rec["message"] = _message(report)
    _emit(rec)


def summarize_tests(path: str) -> dict:
    """Counts, failures, skip reasons and the slowest tests of one results file."""
    counts = dict.fromkeys(OUTCOMES, 0)
    collected, failures, skips, times, last = None, [], {}, [], None
    if os.path.exists(path):
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    else:
        lines = []
    for rec in lines:
        if "collected" in rec:
            collected = rec["collected"]
            continue
        counts[rec["outcome"]] += 1
        last = rec["nodeid"]
        times.append((rec["seconds"], rec["nodeid"]))
        if rec["outcome"] in ("failed", "error", "xpassed"):
            failures.append({k: rec.get(k) for k in ("nodeid", "when", "outcome", "message")})
        elif rec["outcome"] == "skipped":
            skips[rec["message"]] = skips.get(rec["message"], 0) + 1
    times.sort(reverse=True)
    return {"collected": collected, "counts": counts, "failures": failures[:40],
            "skip_reasons": skips, "last_test": last,
            "slowest": [{"nodeid": n, "seconds": s} for s, n in times[:10]]}


# --- the report -------------------------------------------------------------------------------

def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def stage_status(kind: str, rc: int | None, limit: int | None, found: dict | None,
                 asked: str | None) -> str:
    """A stage's status from its exit code, what it wrote, and the status the script asked
    for (a stage that only collected its tests says why)."""
    if rc is None:  # the stage did not run
        return asked or "skipped: not run"
    if rc in (124, 137):  # timeout's own codes: stopped, or killed after the grace period
        return f"timed out after {limit} s"
    said = (found or {}).get("status", "")
    if kind == "bench" and said.startswith("skipped"):
        return said
    if rc != 0:
        detail = said if said.startswith("failed") else ""
        if kind == "tests" and found:
            c = found["counts"]
            detail = (f"{c['failed']} failed, {c['error']} errors" if any(c.values()) or
                      found["collected"] else "no test collected (see the log)")
        return f"failed (exit {rc})" + (f": {detail}" if detail else "")
    if asked and kind == "tests" and found and found["counts"]["passed"]:
        return "ok"  # tests ran and passed: not a skipped stage, whatever was expected
    return asked or "ok"


def record(args) -> dict:
    report = _load(args.report)
    found = None
    if args.details and os.path.exists(args.details):
        found = summarize_tests(args.details) if args.kind == "tests" else _load(args.details)
    elif args.kind == "tests" and args.details:
        found = summarize_tests(args.details)  # nothing ran: zero counts
    status = stage_status(args.kind, args.rc, args.limit, found, args.status)
    entry = {"kind": args.kind, "status": status, "rc": args.rc, "log": args.log,
             "limit_s": args.limit,
             "seconds": round(time.time() - args.started, 1) if args.started else None}
    if found is not None:
        entry["tests" if args.kind == "tests" else
              "figures" if args.kind == "bench" else "details"] = found
    report["stages"][args.stage] = entry
    check_report(report)
    write_json(args.report, report)
    print(f"   {args.stage}: {status}")
    return entry


def check_report(report: dict) -> None:
    """Raise ValueError, naming the field, where ``report`` is not a gpu_check report."""
    def need(cond, what):
        if not cond:
            raise ValueError(f"gpu_check report: {what}")

    need(isinstance(report, dict), f"expected a JSON object, got {type(report).__name__}")
    need(report.get("schema") == SCHEMA, f"schema must be {SCHEMA!r}, got "
                                         f"{report.get('schema')!r}")
    need(isinstance(report.get("dry_run"), bool), "dry_run must be true or false")
    need(isinstance(report.get("budget_s"), int), "budget_s must be an integer")
    stages = report.get("stages")
    need(isinstance(stages, dict), "stages must be an object")
    for name, st in stages.items():
        where = f"stages.{name}"
        need(isinstance(st, dict), f"{where} must be an object")
        need(st.get("kind") in KINDS, f"{where}.kind must be one of {KINDS}, got "
                                      f"{st.get('kind')!r}")
        need(isinstance(st.get("status"), str) and STATUS.match(st["status"]),
             f"{where}.status must be ok, 'skipped: ...', 'failed (exit N)...' or 'timed out "
             f"after N s', got {st.get('status')!r}")
        need(st.get("rc") is None or isinstance(st["rc"], int), f"{where}.rc must be an int")
        need(isinstance(st.get("log"), str) and "/" not in st["log"],
             f"{where}.log must be a file name in the output folder")
        if st["kind"] == "tests" and "tests" in st:
            counts = st["tests"].get("counts", {})
            need(set(counts) == set(OUTCOMES) and all(isinstance(v, int) and v >= 0
                                                      for v in counts.values()),
                 f"{where}.tests.counts must give a count for each of {OUTCOMES}")
        if st["kind"] == "bench" and "figures" in st:
            need(isinstance(st["figures"].get("sections"), dict),
                 f"{where}.figures.sections must be an object")
    if "summary" in report:
        need(report["summary"] == {k: v["status"] for k, v in stages.items()},
             "summary must give each stage's status")


def finish(path: str) -> int:
    report = _load(path)
    report["finished"] = now()
    report["summary"] = {k: v["status"] for k, v in report["stages"].items()}
    bad = [k for k, s in report["summary"].items() if not s.startswith(("ok", "skipped"))]
    report["ok"] = not bad
    check_report(report)
    write_json(path, report)
    print("\nstage            status")
    for k, v in report["stages"].items():
        extra = ""
        if "tests" in v:
            c = v["tests"]["counts"]
            extra = (f"  ({c['passed']} passed, {c['failed']} failed, {c['error']} errors, "
                     f"{c['skipped']} skipped of {v['tests']['collected'] or 0} collected)")
        print(f"{k:<16} {v['status']}{extra}")
    print(f"report: {path}")
    return 1 if bad else 0


# --- the machine ------------------------------------------------------------------------------

DISTRIBUTIONS = ("torch", "triton", "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt",
                 "jax-cuda12-plugin", "jax-cuda12-pjrt", "equinox", "optax", "numpy",
                 "safetensors", "hypothesis", "pytest", "array-api-compat", "mamba-ssm",
                 "setuptools", "memcore")


def environment() -> dict:
    """Versions, the devices torch and JAX see, and the settings the tests read."""
    import platform
    import subprocess
    from importlib import metadata

    from .harness import machine

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    env = {"machine": machine(), "python": sys.version.split()[0],
           "platform": platform.platform(),
           "packages": {d: version(d) for d in DISTRIBUTIONS},
           "settings": {k: os.environ.get(k) for k in (
               "TRITON_INTERPRET", "MEMCORE_KERNELS_INTERPRET", "MEMCORE_KERNELS",
               "MEMCORE_SCAN", "XLA_PYTHON_CLIENT_PREALLOCATE", "PYTHONPATH")}}
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        env["devices"] = [dict(name=p.name, capability=f"{p.major}.{p.minor}",
                               memory_gib=round(p.total_memory / 2**30, 1),
                               multiprocessors=p.multi_processor_count)
                          for p in map(torch.cuda.get_device_properties,
                                       range(torch.cuda.device_count()))]
    except Exception as e:  # noqa: BLE001 - the report says what failed
        env["cuda_available"], env["torch_error"] = False, repr(e)
    try:
        import memcore

        env["memcore_file"] = memcore.__file__
    except Exception as e:  # noqa: BLE001
        env["memcore_error"] = repr(e)
    try:
        import jax

        env["jax_devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    except Exception as e:  # noqa: BLE001
        env["jax_error"] = repr(e)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=15)
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        env["nvidia_smi"] = f"not run: {e}"
    return env


# --- the command line -------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("init")
    a.add_argument("report")
    a.add_argument("--budget", type=int, required=True)
    a.add_argument("--dry-run", action="store_true")
    a = sub.add_parser("env")
    a.add_argument("--json", required=True)
    sub.add_parser("has-cuda").add_argument("env_json")
    sub.add_parser("gpu-tests")
    sub.add_parser("kernel-tests")
    a = sub.add_parser("record")
    a.add_argument("report")
    a.add_argument("--stage", required=True)
    a.add_argument("--kind", required=True, choices=KINDS)
    a.add_argument("--log", required=True)
    a.add_argument("--rc", type=int, default=None)
    a.add_argument("--limit", type=int, default=None)
    a.add_argument("--started", type=float, default=None, help="epoch seconds")
    a.add_argument("--details", default=None)
    a.add_argument("--status", default=None)
    sub.add_parser("finish").add_argument("report")
    args = p.parse_args(argv)

    if args.cmd == "init":
        report = {"schema": SCHEMA, "dry_run": args.dry_run, "budget_s": args.budget,
                  "started": now(), "stages": {}}
        check_report(report)
        write_json(args.report, report)
    elif args.cmd == "env":
        env = environment()
        for key, value in env.items():
            print(f"{key}: {value}")
        write_json(args.json, env)
    elif args.cmd == "has-cuda":
        return 0 if os.path.exists(args.env_json) and _load(args.env_json).get(
            "cuda_available") else 1
    elif args.cmd in ("gpu-tests", "kernel-tests"):
        found = gpu_tests() if args.cmd == "gpu-tests" else kernel_tests()
        if not found:
            print(f"gpu_check: no {args.cmd} found under {os.getcwd()}/tests", file=sys.stderr)
            return 1
        print("\n".join(found))
    elif args.cmd == "record":
        record(args)
    elif args.cmd == "finish":
        return finish(args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
