"""Bad-input cases run under a memory cap and a timeout, so that a regression that allocates
without bound or hangs fails its case instead of exhausting the machine.

The cap lowers the soft RLIMIT_AS of the test process to its current address space plus
``HEADROOM`` for the duration of one case (and restores it afterwards): an allocation beyond it
fails at once (MemoryError in numpy, RuntimeError in torch and XLA), which the case's
``pytest.raises`` does not accept. The timeout raises TimeoutError through SIGALRM; a hang
inside native code that never returns to Python is ended by faulthandler, which prints the
stacks and exits the process, failing the run.

A case is ``pytest.param(fn, exc, pattern, id=...)``: ``fn()`` must raise ``exc`` with a message
matching ``pattern``, and every pattern names the argument at fault.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import resource
import signal

import pytest

HEADROOM = 3 * 2**30  # bytes a case may add to the address space
SECONDS = 20  # per case; ``faulthandler`` ends the process at three times this


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _alarm(signum, frame):
    raise TimeoutError(f"the case ran past {SECONDS} s")


@contextlib.contextmanager
def bounded(seconds: int = SECONDS, headroom: int = HEADROOM):
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _address_space() + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    previous = signal.signal(signal.SIGALRM, _alarm)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(3 * seconds, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_case(fn, exc, pattern) -> None:
    with bounded(), pytest.raises(exc, match=pattern):
        fn()


@pytest.fixture
def limited():
    """``limited(fn, exc, pattern)``: ``run_case`` for a test."""
    return run_case
