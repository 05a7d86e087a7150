"""DistributedDataParallel over 2 CPU processes (gloo): each rank runs half of the batch; the
averaged loss and gradients equal one process on the whole batch."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchcheck import F64, rel

import memcore
from memcore import spec as S

WORLD = 2
TIMEOUT_S = 240
SPEC = S.model([S.bmojo(6, 2, window=2, chunk=3, select=1, capacity=2, d_state=2),
                S.mosaic(6, 2, capacity=3)], 11)


class _LogitsAux(torch.nn.Module):
    """The model's logits and aux as its forward's outputs, so that DDP sees both."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        logits, _, aux = self.model.forward_aux(tokens)
        return logits, aux


def _loss(model, tokens):
    logits, aux = model(tokens[:, :-1])
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, SPEC.vocab_size),
                                           tokens[:, 1:].reshape(-1))
    return ce + 0.1 * aux


def _tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, SPEC.vocab_size, (2 * WORLD, 8), generator=g)


def _worker(rank: int, port: int, out_dir: str):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        params = memcore.init(SPEC, 0, dtype=np.float64)
        model = memcore.realize(SPEC, backend="torch", params=params)
        ddp = torch.nn.parallel.DistributedDataParallel(_LogitsAux(model),
                                                    find_unused_parameters=True)
        tokens = _tokens().chunk(WORLD)[rank]
        loss = _loss(ddp, tokens)
        loss.backward()  # DDP averages the gradients over the ranks
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= WORLD
        if rank == 0:
            grads = {n: p.grad for n, p in model.named_parameters()}
            torch.save({"loss": mean_loss, "grads": grads}, os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_matches_one_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    ctx = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    start = time.monotonic()
    while not ctx.join(timeout=5):
        if time.monotonic() - start > TIMEOUT_S:
            for p in ctx.processes:
                p.terminate()
            pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    got = torch.load(tmp_path / "ddp.pt")

    params = memcore.init(SPEC, 0, dtype=np.float64)
    model = memcore.realize(SPEC, backend="torch", params=params)
    loss = _loss(_LogitsAux(model), _tokens())
    loss.backward()
    assert rel(got["loss"], loss.detach()) <= F64
    for name, p in model.named_parameters():
        assert got["grads"][name] is not None, name
        assert rel(got["grads"][name], p.grad) <= F64, name
