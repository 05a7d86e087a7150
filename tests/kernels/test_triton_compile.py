"""Every Triton kernel compiled for real GPUs (sm_90, sm_80; sm_89 for its smaller shared
memory), on a machine without one.

The interpret-mode tests prove the kernels' arithmetic, not that the compiler accepts them:
the interpreter lets through tl.dot tiles under 16, non-power-of-two aranges, loop variables
that change type, and tiles too big for a block's shared memory. Here the launchers run as
they would on a GPU, on ``meta`` tensors of realistic shapes (head widths 16 to 128, float32,
bfloat16 and float16, and sizes where B*T*H*E passes 2**31), forward and backward; every
launch is recorded with the constexprs and tiles the launcher picked and compiled with
``memcore.kernels.triton.aot`` through triton's whole pipeline down to a cubin (the bundled
ptxas). A case fails when a launch does not compile, when it would not launch (grid over the
hardware limit, shared memory over the target's), or when it spills more than
``MAX_STACK`` bytes of registers per thread.

The kernel modules must be imported without TRITON_INTERPRET, which tests/conftest.py
sets, so the compiling runs in two child processes side by side: this file run as a script,
``python tests/kernels/test_triton_compile.py OUT.json sm90-CASE sm80-CASE ...``. The children
start with an empty triton cache, as CI does, so the time measured is the real one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback

import pytest
import torch

triton = pytest.importorskip("triton", reason="compiling the kernels needs triton")
import triton.language as tl  # noqa: E402

MAX_STACK = 1024  # bytes of stack per thread: more means the tiles spill heavily
META = "meta"  # shapes and dtypes without storage: realistic sizes cost nothing


def _t(*shape, dtype=torch.float32, grad=True):
    t = torch.empty(*shape, dtype=dtype, device=META)
    return t.requires_grad_() if grad else t


# --- the cases: each runs a launcher forward and backward ------------------------------------

def _scan(dtype, Bt, Dc, T, N, groups=None, full=True, packed=False):
    from memcore.kernels.triton import selective_scan as mod

    bc = (Bt, N, T) if groups is None else (Bt, groups, N, T)
    opt = {}
    if full:  # every optional input, an initial state and a gradient through the final state
        opt = dict(D=_t(Dc), z=_t(Bt, Dc, T, dtype=dtype), delta_bias=_t(Dc),
                   initial_state=_t(Bt, Dc, N))
    y, hT = mod.selective_scan(_t(Bt, Dc, T, dtype=dtype), _t(Bt, Dc, T, dtype=dtype),
                               _t(Dc, N), _t(*bc, dtype=dtype), _t(*bc, dtype=dtype),
                               delta_softplus=full, return_final_state=True,
                               reset=_t(T, dtype=torch.bool, grad=False) if packed else None,
                               **opt)
    (y.float().sum() + (hT.sum() if full else 0)).backward()
    return [mod]


def _leaky(dtype, Bt, T, H, E, packed=False):
    from memcore.kernels.triton import leaky_average as mod

    reset = _t(T, dtype=torch.bool, grad=False) if packed else None
    y, hT = mod.leaky_average(_t(Bt, T, H, E, dtype=dtype), _t(H),
                              initial_state=None if packed else _t(Bt, H, E),
                              return_final_state=True, reset=reset)
    (y.float().sum() + hT.sum()).backward()
    return [mod]


def _attention(dtype, Bt, T, H, E, W, fading=True, store=None, cache=0):
    """store: (chunk, slots) or None; cache: keys before the queries (the queries' pos)."""
    from memcore.kernels.triton import windowed_readout as mod

    q = _t(Bt, T, H, E, dtype=dtype)
    kv = [_t(Bt, cache + T, H, E, dtype=dtype) for _ in range(4 if fading else 2)]
    if not fading:
        kv += [None, None]
    st = (None,) * 4
    if store is not None:
        C, M = store
        S = (cache + T - 1) // C - cache // C + 1
        st = (_t(Bt, H, S, M, E, dtype=dtype), _t(Bt, H, S, M, E, dtype=dtype),
              _t(Bt, S, M, dtype=torch.int64, grad=False), C)
    mod.windowed_readout(q, *kv[:2], W, *kv[2:], *st, pos=cache).float().sum().backward()
    return [mod]


def _docs(T):
    """A packed row's per-position document bounds, as the launchers build them from
    cu_seqlens (which a meta tensor cannot hold)."""
    return _t(2, T, dtype=torch.int64, grad=False)


def _packed_attention(dtype, T, H, E, W, fading=True):
    from memcore.kernels.triton import windowed_readout as mod

    kv = [_t(1, T, H, E, dtype=dtype) for _ in range(4 if fading else 2)] + [None, None]
    mod._WindowedReadout.apply(_t(1, T, H, E, dtype=dtype), *kv[:4], None, None, None, W, 0,
                               None, _docs(T)).float().sum().backward()
    return [mod]


def _packed_readout(dtype, T, H, E, capacity):
    from memcore.kernels.triton import associative_readout as mod

    mod._AssociativeReadout.apply(_t(1, T, H, E, dtype=dtype), _t(1, T, H, E, dtype=dtype),
                                  capacity, _docs(T)).float().sum().backward()
    return [mod]


def _readout(dtype, Bt, T, H, E, capacity):
    from memcore.kernels.triton import associative_readout as mod

    mod.associative_readout(_t(Bt, T, H, E, dtype=dtype), _t(Bt, T, H, E, dtype=dtype),
                            capacity).float().sum().backward()
    return [mod]


def _innovation(dtype, Bt, T, chunk, select, capacity):
    from memcore.kernels.triton import eidetic_store as mod

    def ints(*shape):
        return _t(*shape, dtype=torch.int64, grad=False)

    def floats(*shape):
        return _t(*shape, dtype=dtype, grad=False)

    # a call starting inside a chunk: carried candidates, a short first chunk
    mod.select_indices(floats(Bt, T), 5, chunk, select, floats(Bt, capacity), ints(Bt, capacity),
                       floats(Bt, select), ints(Bt, select))
    mod.top_indices(floats(Bt, capacity), ints(Bt, capacity), floats(Bt, select),
                    ints(Bt, select), capacity)
    return [mod]


BIG_T = 2**20  # with these widths B*T*H*E (or B*Dc*T) passes 2**31: int64 offsets needed
f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
CASES = {
    # name: (targets, builder)
    "scan_bf16_mamba": ((90, 80), lambda: _scan(bf16, 4, 2048, 4096, 16)),
    "scan_f32_groups_n64": ((90,), lambda: _scan(f32, 2, 1536, 1000, 64, groups=2, full=False)),
    "scan_f16_long": ((90,), lambda: _scan(f16, 1, 2048, BIG_T, 16, full=False)),
    "leaky_bf16_e64": ((90, 80), lambda: _leaky(bf16, 2, 4096, 8, 64)),
    "leaky_f32_e72_long": ((90,), lambda: _leaky(f32, 1, BIG_T, 32, 72)),
    "leaky_f16_e16": ((90,), lambda: _leaky(f16, 2, 4096, 8, 16)),
    "attention_bf16_e64_all": ((90,), lambda: _attention(bf16, 2, 8192, 16, 64, 512,
                                                         store=(128, 64), cache=700)),
    # 16-bit and float32 heads of 128 on the GPUs with the least shared memory per block
    "attention_bf16_e128_all": ((80, 89), lambda: _attention(bf16, 2, 8192, 16, 128, 512,
                                                              store=(128, 64), cache=700)),
    "attention_f16_e128_long": ((90,), lambda: _attention(f16, 1, BIG_T, 16, 128, 1024,
                                                          fading=False)),
    "attention_f32_e16": ((90,), lambda: _attention(f32, 2, 8192, 16, 16, 512, fading=False)),
    "attention_f64_e32_all": ((90,), lambda: _attention(f64, 1, 512, 4, 32, 64,
                                                        store=(16, 4), cache=3)),
    "readout_bf16_e128_capacity": ((90,), lambda: _readout(bf16, 2, 8192, 16, 128, 1024)),
    "readout_f32_e128": ((80, 89), lambda: _readout(f32, 2, 8192, 16, 128, None)),
    "readout_f32_e16": ((90,), lambda: _readout(f32, 2, 8192, 16, 16, None)),
    "innovation_f32": ((90,), lambda: _innovation(f32, 4, 8192, 128, 8, 64)),
    # packed rows (cu_seqlens): the restarts and the document masks
    "packed_scan_bf16": ((90,), lambda: _scan(bf16, 1, 2048, 8192, 16, packed=True)),
    "packed_leaky_bf16_e64": ((90,), lambda: _leaky(bf16, 1, 8192, 8, 64, packed=True)),
    "packed_attention_bf16_e128": ((90, 80), lambda: _packed_attention(bf16, 8192, 16, 128,
                                                                       512)),
    "packed_readout_bf16_e128": ((90, 80), lambda: _packed_readout(bf16, 8192, 16, 128, 1024)),
    "packed_readout_f32_e16": ((90,), lambda: _packed_readout(f32, 8192, 16, 16, None)),
    # more chunks than a grid's second axis holds (65535)
    "innovation_f64_many_chunks": ((90,), lambda: _innovation(f64, 2, BIG_T, 8, 2, 4)),
}


@triton.jit
def _bad_kernel(x, BLOCK: tl.constexpr):
    # a tile of 3 rows: the interpreter runs it, the compiler must refuse it
    i = tl.arange(0, BLOCK)
    tl.store(x + i, tl.load(x + i) + 1.0)


# --- the child process: compile and report ---------------------------------------------------

def _compile_case(name, arch):
    from memcore.kernels.triton import aot

    _, build = CASES[name]
    rows = []
    t0 = time.time()
    try:
        with aot.capture(*_modules(), arch=arch) as launches:
            build()
    except Exception:  # noqa: BLE001 - a launcher that fails on GPU shapes fails the case
        return {"launches": [], "build_error": traceback.format_exc()[-3000:]}
    for launch in launches:
        row = {"kernel": launch.name, "grid": list(launch.grid),
               "constexprs": {k: str(v) for k, v in launch.kwargs.items()}}
        try:
            kernel = aot.compile_launch(launch, arch)
        except Exception as e:  # noqa: BLE001 - the compiler's error is the result
            row["error"] = "".join(traceback.format_exception_only(type(e), e))[-3000:]
            rows.append(row)
            continue
        res = aot.resources(kernel) or {}
        row.update(ptx_entry=f".entry {launch.name}" in kernel.asm["ptx"],
                   cubin_bytes=len(kernel.asm["cubin"]), shared=kernel.metadata.shared,
                   problems=aot.problems(launch, kernel, arch), stack=res.get("STACK"),
                   regs=res.get("REG"))
        rows.append(row)
    return {"launches": rows, "seconds": time.time() - t0}


def _modules():
    """Every module of memcore.kernels.triton, so that a new kernel is found without a list."""
    import importlib
    import pkgutil

    import memcore.kernels.triton as pkg

    return [importlib.import_module(f"{pkg.__name__}.{m.name}")
            for m in pkgutil.iter_modules(pkg.__path__)]


def _child(out, jobs):
    """Compiles the cases ``jobs`` ("sm90-name") and writes the report to ``out``."""
    from memcore.kernels.triton import aot

    report = {"cases": {}, "bad": {},
              "kernels": sorted(n for m in _modules() for n in aot.kernels_of(m))}
    for job in jobs:
        arch, name = _job(job)
        report["cases"][job] = _compile_case(name, arch)
    # the check that the check can fail: a kernel the compiler must refuse
    for arch in sorted({_job(job)[0] for job in jobs}):
        bad = aot.Launch("_bad_kernel", _bad_kernel, (1,), (torch.empty(3, device=META),),
                         {"BLOCK": 3})
        try:
            aot.compile_launch(bad, arch)
            report["bad"][arch] = None
        except Exception as e:  # noqa: BLE001
            report["bad"][arch] = f"{type(e).__name__}: {e}"[-500:]
    with open(out, "w") as f:
        json.dump(report, f)


def _job(job):
    arch, name = job.split("-", 1)
    return int(arch[2:]), name


# --- the tests -------------------------------------------------------------------------------

def _offline_compile_missing() -> str | None:
    """Why this triton cannot compile for a CUDA target without a GPU, or None if it can."""
    try:
        import triton.backends.nvidia as nv
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"this triton has no CUDA backend or no ASTSource/GPUTarget to compile with ({e})"
    try:
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as e:
        return (f"triton {triton.__version__} lacks the launch binder that "
                f"memcore.kernels.triton.aot specialises arguments with ({e})")
    if not hasattr(JITFunction, "_pack_args"):
        return (f"triton {triton.__version__}'s JITFunction has no _pack_args, which "
                f"memcore.kernels.triton.aot uses to build a launch's signature")
    ptxas = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    if not os.path.exists(ptxas) and not os.environ.get("TRITON_PTXAS_PATH"):
        return f"this triton ships no ptxas ({ptxas} is missing) and TRITON_PTXAS_PATH is unset"
    return None


CASE_IDS = [f"sm{arch}-{name}" for name, (archs, _) in CASES.items() for arch in archs]
WORKERS = 2  # child processes side by side, the cases dealt round-robin


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """{"cases": {case id: report}, "kernels": [...], "bad": {arch: error}} from the children."""
    why = _offline_compile_missing()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "MEMCORE_KERNELS_POISON")}
    env["TRITON_CACHE_DIR"] = str(root / "cache")  # clean, as in CI
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(here)),
                                         env.get("PYTHONPATH", "")])
    procs = []
    for w in range(WORKERS):
        out = root / f"worker{w}.json"
        cmd = [sys.executable, os.path.abspath(__file__), str(out), *CASE_IDS[w::WORKERS]]
        procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True), out))
    found = {"cases": {}, "bad": {}, "kernels": []}
    for proc, out in procs:
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"a compile process failed:\n{log[-4000:]}"
        with open(out) as f:
            rep = json.load(f)
        found["cases"].update(rep["cases"])
        found["bad"].update({int(k): v for k, v in rep["bad"].items()})
        found["kernels"] = rep["kernels"]
    return found


@pytest.mark.parametrize("case", CASE_IDS)
def test_kernels_compile(reports, case):
    rep = reports["cases"][case]
    assert "build_error" not in rep, f"{case}: the launcher failed:\n{rep['build_error']}"
    rows = rep["launches"]
    assert rows, f"{case}: the launchers launched no kernel"
    for row in rows:
        what = f"{case}: {row['kernel']} {row['constexprs']} grid {row['grid']}"
        assert "error" not in row, f"{what} does not compile:\n{row['error']}"
        assert row["ptx_entry"] and row["cubin_bytes"] > 0, f"{what}: no PTX entry or cubin"
        assert not row["problems"], f"{what} would not launch: {row['problems']}"
        if row["stack"] is not None:
            assert row["stack"] <= MAX_STACK, (f"{what} spills: {row['stack']} bytes of stack "
                                               f"per thread, {row['regs']} registers")


def _launches(reports, arch=None):
    return [row for case, rep in reports["cases"].items()
            if arch is None or _job(case)[0] == arch for row in rep["launches"]]


def test_every_kernel_is_compiled(reports):
    compiled = {row["kernel"] for row in _launches(reports, 90)}
    assert reports["kernels"], "no kernel found in memcore.kernels.triton"
    missing = sorted(set(reports["kernels"]) - compiled)
    assert not missing, f"kernels no case compiles for sm_90: {missing}"


def test_every_source_and_mode_is_compiled(reports):
    # the attention's three key sources and the readout's capacity are constexpr branches
    seen = [(row["kernel"], row["constexprs"]) for row in _launches(reports)]
    modes = {c.get("MODE") for k, c in seen if k == "_attn_dkdv_kernel"}
    assert modes >= {"0", "1", "2"}, f"key/value gradient modes compiled: {modes}"
    flags = {(c["HAS_FADING"], c["HAS_STORE"]) for k, c in seen if k == "_attn_fwd_kernel"}
    assert ("True", "True") in flags and ("False", "False") in flags, flags
    caps = {c["HAS_CAP"] for k, c in seen if k == "_readout_fwd_kernel"}
    assert caps == {"True", "False"}, caps
    dtypes = {c["ACC"] for k, c in seen if k == "_scan_fwd_kernel"}
    assert dtypes == {"fp32"}, dtypes  # float32 accumulation for every input dtype
    # packed rows: the restarts and the document masks are constexpr branches too
    for kernel, flag in (("_scan_fwd_kernel", "HAS_RESET"), ("_leaky_fwd_kernel", "HAS_RESET"),
                         ("_leaky_bwd_kernel", "HAS_RESET"), ("_attn_fwd_kernel", "HAS_DOCS"),
                         ("_readout_fwd_kernel", "HAS_DOCS")):
        got = {c.get(flag) for k, c in seen if k == kernel}
        assert got == {"True", "False"}, f"{kernel} {flag} compiled: {got}"


def test_compiler_refusal_is_caught(reports):
    for arch in (90, 89, 80):
        assert reports["bad"].get(arch), (f"sm_{arch}: a tile of 3 compiled, or was not tried; "
                                          f"the check would pass anything")


def test_launch_limits_are_checked():
    # what ``problems`` must refuse, on a stand-in for a compiled kernel
    from types import SimpleNamespace

    from memcore.kernels.triton import aot

    launch = aot.Launch("k", None, (2**31, 70000, 1), (), {})
    fits = SimpleNamespace(metadata=SimpleNamespace(shared=aot.MAX_SHARED[89]))
    found = aot.problems(launch, fits, 89)
    assert len(found) == 2 and "axis 0" in found[0] and "axis 1" in found[1], found
    big = SimpleNamespace(metadata=SimpleNamespace(shared=aot.MAX_SHARED[89] + 1))
    assert aot.problems(aot.Launch("k", None, (1, 1, 1), (), {}), big, 89) == [
        f"needs {aot.MAX_SHARED[89] + 1} bytes of shared memory, sm_89 allows "
        f"{aot.MAX_SHARED[89]}"]
    assert aot.problems(aot.Launch("k", None, (1,), (), {}), big, 90) == []


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2:])
