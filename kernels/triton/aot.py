"""Ahead-of-time compilation of the kernels for a GPU target, with no GPU and no driver.

The interpreter (``TRITON_INTERPRET=1``) accepts programs that the real compiler rejects, so
passing the interpret-mode tests says nothing about a GPU. This module runs the real pipeline
(ttir, ttgir, llir, ptx and the cubin through the bundled ptxas) for a chosen target:

1. ``capture``: the launchers (the autograd functions and the index helpers) run as usual on
   ``meta`` tensors, which have shapes and dtypes but no storage, while every kernel of the
   given modules is replaced by a recorder. Each launch is kept: the kernel, its grid, its
   arguments and its constexprs, exactly what a GPU run would pass. Meta tensors cost
   nothing, so the shapes can be the realistic ones (T of a million, B*T*H*E past 2**31).
2. ``compile_launch``: specialises the arguments the way ``JITFunction.run`` does on a GPU
   (the same binder: pointer dtypes, int32 or int64 scalars, 1 as a constant, divisibility by
   16) and calls ``triton.compile`` for the target.
3. ``problems``: what would still fail at launch on that target: a grid dimension over the
   hardware limit, or more shared memory than a block may have.
4. ``resources``: registers and stack per thread from the cubin (the bundled cuobjdump); a
   large stack means the tiles spill registers to local memory.

The launchers pick their GPU tiles when a kernel is not interpreted (the recorder is not) and
size the attention tiles by the device's shared memory (``capture(arch=...)`` gives the
target's), so the compiled programs are the ones that GPU would run. Must run in a process where
``TRITON_INTERPRET`` was not set when the kernel modules were imported (``capture`` checks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction, create_function_from_signature

# Most shared memory one block may use (bytes, opt-in maximum), by compute capability.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
MAX_GRID = (2**31 - 1, 65535, 65535)


@dataclasses.dataclass
class Launch:
    """One kernel launch as a launcher made it."""

    name: str
    fn: JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn: JITFunction, sink: list):
        self.fn = fn
        self.sink = sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            g = tuple(int(x) for x in (grid if isinstance(grid, tuple) else (grid,)))
            self.sink.append(Launch(self.fn.__name__, self.fn, g, args, kwargs))

        return launch


def kernels_of(module) -> dict:
    """The launchable kernels of a module: its ``@triton.jit`` functions named ``*_kernel``."""
    found = {}
    for name, obj in vars(module).items():
        if name.endswith("_kernel") and hasattr(obj, "fn") and hasattr(obj, "arg_names"):
            if not isinstance(obj, JITFunction):
                raise RuntimeError(
                    f"{module.__name__}.{name} is {type(obj).__name__}, not a JITFunction: the "
                    f"module was imported under TRITON_INTERPRET=1, which compiles nothing; "
                    f"import it in a process without that variable")
            found[name] = obj
    return found


@contextlib.contextmanager
def capture(*modules, arch: int | None = None):
    """Within the block, the kernels of ``modules`` record their launches into the list
    yielded instead of running. With ``arch``, the launchers size their tiles for that
    target's shared memory (``buffers.shared_memory_per_block``), as on such a GPU."""
    from . import buffers

    sink: list = []
    saved = []
    for module in modules:
        for name, fn in kernels_of(module).items():
            saved.append((module, name, fn))
            setattr(module, name, _Recorder(fn, sink))
    limit = buffers.shared_memory_per_block
    if arch is not None:
        buffers.shared_memory_per_block = lambda device: MAX_SHARED.get(arch)
    try:
        yield sink
    finally:
        buffers.shared_memory_per_block = limit
        for module, name, fn in saved:
            setattr(module, name, fn)


def target(arch: int) -> GPUTarget:
    """A CUDA target by compute capability (90: H100, 80: A100)."""
    return GPUTarget("cuda", arch, 32)


def compile_launch(launch: Launch, arch: int):
    """Compiles one recorded launch for ``arch``; returns triton's CompiledKernel (its ``asm``
    holds ttir, ttgir, llir, ptx and cubin). Raises what the compiler raises."""
    from triton.compiler import ASTSource, make_backend

    tgt = target(arch)
    backend = make_backend(tgt)
    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    # the options JITFunction.run adds before binding (the last only where this triton has it)
    kwargs = dict(launch.kwargs, debug=False, instrumentation_mode="")
    if hasattr(triton.knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs["fpsan_homomorphic_casts"] = False
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=tgt, options=options.__dict__)


def problems(launch: Launch, kernel, arch: int) -> list[str]:
    """Why the compiled ``kernel`` would still fail to launch on ``arch`` (empty: it would
    not, as far as can be told without a device)."""
    out = []
    for axis, (n, most) in enumerate(zip(launch.grid, MAX_GRID[:len(launch.grid)], strict=True)):
        if n > most:
            out.append(f"grid axis {axis} is {n}, over the limit {most}")
    shared = kernel.metadata.shared
    most = MAX_SHARED.get(arch)
    if most is not None and shared > most:
        out.append(f"needs {shared} bytes of shared memory, sm_{arch} allows {most}")
    return out


def _cuobjdump() -> str | None:
    import triton.backends.nvidia as nv

    path = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def resources(kernel) -> dict | None:
    """{"REG": registers, "STACK": stack bytes per thread, ...} of the compiled cubin, or None
    where triton ships no cuobjdump to read it."""
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    found = dict(re.findall(r"([A-Z]+):(\d+)", out))
    return {k: int(v) for k, v in found.items()} if "REG" in found else None
