"""Data parallel training: two gloo processes on CPU, as torchrun starts them, end where one
process training on the whole batch ends."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

SETUP = """
import numpy as np
from memcore import spec as S
from memcore.tasks import mqar
from memcore.tasks.stack import task_model
from memcore.tasks.train import TrainConfig, train

def batches(step):
    return mqar.generate(4, 64, 16, 2, np.random.default_rng([11, step]))

def fit(out):
    spec = S.model([S.transformer(16, 2), S.transformer(16, 2, window=4)], 64, ffn=None,
                   short_conv=3)
    model = task_model("torch", spec, 0)
    train(model, batches, TrainConfig(steps=3, lr=3e-3, log_every=0, out_dir=out,
                                      checkpoint_every=3), quiet=True)
    return model
"""

WORKER = SETUP + textwrap.dedent("""
    import sys
    from safetensors.torch import save_file
    model = fit(sys.argv[1])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              f"{sys.argv[1]}/params-{sys.argv[2]}.safetensors")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, world: int, out: str):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), out, str(rank)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        text = p.communicate(timeout=240)[0].decode()
        assert p.returncode == 0, text[-3000:]


def test_two_gloo_ranks_match_one_process(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from safetensors.torch import load_file

    two = str(tmp_path / "two")
    os.makedirs(two)
    _launch(tmp_path, 2, two)
    scope: dict = {}
    exec(SETUP, scope)  # the same training, in this process, on the whole batch
    ref = scope["fit"](str(tmp_path / "one")).state_dict()
    for rank in (0, 1):
        got = load_file(f"{two}/params-{rank}.safetensors")
        for k, v in ref.items():
            # same math, different float32 summation order across the two ranks
            np.testing.assert_allclose(got[k].numpy(), v.detach().numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=k)
    assert os.path.exists(f"{two}/checkpoint.safetensors")  # written by rank 0
