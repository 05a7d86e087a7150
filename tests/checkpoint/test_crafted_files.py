"""Crafted bad files (tests/checkpoint/crafted.py): each must be refused by ``load_params`` with
a clear error (ValueError unless a better type fits) whose message names the file and, where
there is one, the entry at fault. Every case runs in a forked child (tests/checkpoint/sandbox.py)
under a memory cap and a time limit, so a loader that hangs or reads without bound fails its
case and the suite goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.checkpoint.crafted import CASES, GOOD, PARAMS

pytestmark = pytest.mark.skipif(not (hasattr(os, "fork") and os.path.isdir("/proc/self")),
                                reason="the sandbox forks and reads /proc (Linux)")

HERE = Path(__file__).resolve().parent
TIMEOUT = 20.0  # seconds a case may take; a good one takes milliseconds
MEMORY = 512 * 2**20  # bytes a case may map beyond what the loader process already has
LIMIT = 2**30  # the allocation limit the sandbox runs under (MEMCORE_MAX_ALLOC_BYTES)


@pytest.fixture(scope="module")
def sandbox():
    """A warm loader process (sandbox.py) that forks one capped child per case."""
    env = dict(os.environ, MEMCORE_MAX_ALLOC_BYTES=str(LIMIT), OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(HERE / "sandbox.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert json.loads(proc.stdout.readline()) == {"ready": True}

    def load(path: Path) -> dict:
        proc.stdin.write(json.dumps({"path": str(path), "timeout": TIMEOUT,
                                     "memory": MEMORY}) + "\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())

    yield load
    proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_there_are_enough_cases():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_crafted_file(tmp_path, sandbox, case):
    path = case.make(tmp_path)
    got = sandbox(path)
    if case.error is None:
        assert got["outcome"] == "returned", got
        assert json.loads(got["summary"]) == {k: ["float32", list(v.shape)]
                                              for k, v in PARAMS.items()}
        return
    assert got["outcome"] == "raised", got  # not a hang, a crash or a load
    assert case.error.__name__ in got["types"], got
    message = got["message"]
    assert str(path) in message, message
    if case.entry is not None:
        assert case.entry in message, message
    for word in case.words:
        assert word in message.lower(), (word, message)


@settings(max_examples=30, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)),
                      min_size=1, max_size=4),
       keep=st.integers(0, len(GOOD)))
def test_damaged_copies_of_a_good_file(tmp_path_factory, sandbox, edits, keep):
    """Bytes overwritten anywhere, then the file cut anywhere: it loads (the damage fell in the
    data, or changed nothing that matters) or is refused with a ValueError naming the file;
    never anything else."""
    blob = bytearray(GOOD)
    for at, value in edits:
        blob[at] = value
    path = tmp_path_factory.mktemp("damaged") / "crafted.safetensors"
    path.write_bytes(bytes(blob[:keep]))
    got = sandbox(path)
    if got["outcome"] != "returned":
        assert got["outcome"] == "raised" and "ValueError" in got["types"], got
        assert str(path) in got["message"], got


_SELF_CHECK = """
import json, os, sys
import numpy as np
import sandbox

def blocking(path):
    with open(path, "rb") as f:  # a FIFO without a writer: open blocks
        return f.read()

def runaway(path):
    with open(path, "rb") as f:  # /dev/zero: reads until memory runs out
        return f.read()

def runaway_numpy(path):
    return np.ones(2**40, np.uint8)  # 1 TiB

fifo, cap = sys.argv[1], 64 * 2**20
print(json.dumps([sandbox.run(blocking, fifo, 0.5, cap),
                  sandbox.run(runaway, "/dev/zero", 20, cap),
                  sandbox.run(runaway_numpy, "/dev/zero", 20, cap)]))
"""


def test_sandbox_catches_a_hang_and_a_runaway(tmp_path):
    """The time limit and the memory cap work: a loader that blocks, or that allocates without
    bound, is a failed case, not a stalled suite."""
    os.mkfifo(tmp_path / "pipe")
    out = subprocess.run([sys.executable, "-c", _SELF_CHECK, str(tmp_path / "pipe")], cwd=HERE,
                         capture_output=True, text=True, timeout=120, check=True)
    hang, runaway, runaway_numpy = json.loads(out.stdout)
    assert hang == {"outcome": "timeout"}
    for got in (runaway, runaway_numpy):
        assert got["outcome"] == "raised" and got["type"] == "MemoryError", got
