"""Runs a checkpoint loader on one file at a time in a forked child under a memory cap and a
time limit, so that a loader which hangs or allocates without bound fails its case instead of
stalling or swapping the test session.

    python sandbox.py [module:function]        # default memcore.checkpoint:load_params

Requests arrive on stdin, one JSON object per line: {"path", "timeout" (s), "memory" (bytes
the child may map beyond what it has at the start)}. Each reply is one JSON line:
{"outcome": "returned", "summary"} | {"outcome": "raised", "type", "types", "message"} |
{"outcome": "timeout"} | {"outcome": "died", "signal"}. The first line written is
{"ready": true}, once the loader is imported (children fork from this warm process).
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import select
import signal
import sys
import time


def _mapped_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _summary(result) -> str:
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
        return json.dumps({k: [str(v.dtype), list(v.shape)] for k, v in result[1].items()})
    return repr(result)[:500]


def _child(load, path: str, memory: int, out: int) -> None:
    os.dup2(2, 1)  # stdout carries the replies: the loader's prints go to stderr
    cap = _mapped_bytes() + memory
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        reply = {"outcome": "returned", "summary": _summary(load(path))}
    except BaseException as err:  # noqa: B036 - MemoryError and RecursionError are outcomes
        reply = {"outcome": "raised", "type": type(err).__name__,
                 "types": [c.__name__ for c in type(err).__mro__], "message": str(err)[:4000]}
    os.write(out, json.dumps(reply).encode())
    os._exit(0)


def run(load, path: str, timeout: float, memory: int) -> dict:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            _child(load, path, memory, write)
        finally:
            os._exit(1)
    os.close(write)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            ready = select.select([read], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"outcome": "timeout"}
            chunk = os.read(read, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read)
    _, status = os.waitpid(pid, 0)
    if chunks:
        return json.loads(b"".join(chunks))
    return {"outcome": "died", "signal": -os.waitstatus_to_exitcode(status)}


def main() -> None:
    target = sys.argv[1] if len(sys.argv) > 1 else "memcore.checkpoint:load_params"
    module, name = target.split(":")
    load = getattr(importlib.import_module(module), name)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        print(json.dumps(run(load, req["path"], req["timeout"], req["memory"])), flush=True)


if __name__ == "__main__":
    main()
