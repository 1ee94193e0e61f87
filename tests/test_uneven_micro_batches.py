"""Ranks with different numbers of micro-batches in one step (``data.batch_by_tokens``): with
``mmkit.train.distributed.even_micro_batches`` DDP and FSDP2 neither hang nor change the update -- 2 gloo
processes, one with 3 micro-batches and one with 1, give the gradient of the whole batch in one process."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from mmkit.train import distributed as dist_utils


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)


def _rank(rank: int, world: int, strategy: str, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a mismatch fails instead of hanging
    ctx = dist_utils.Context(rank, world, 0)
    x, y = _data()
    # rank 0: rows 0-5 in 3 micro-batches of 2; rank 1: rows 6-7 in 1
    mine = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 6, 2)] if rank == 0 else [(x[6:], y[6:])]
    model = _model()
    train = DistributedDataParallel(model) if strategy == "ddp" else fully_shard(model)
    batches, weights = dist_utils.even_micro_batches(mine, ctx)
    assert len(batches) == 3 and weights == ([1.0] * 3 if rank == 0 else [1.0, 0.0, 0.0])
    for k, ((xb, yb), w) in enumerate(zip(batches, weights)):
        with dist_utils.no_sync(train, k < len(batches) - 1):
            loss = ((train(xb) - yb) ** 2).sum() * (w * world / len(x))  # DDP averages over ranks
        loss.backward()
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in model.parameters()]
    if rank == 0:
        torch.save([g.detach().clone() for g in grads], out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_uneven_micro_batches_give_the_whole_batch_gradient(tmp_path, strategy):
    out = str(tmp_path / "grads.pt")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank, args=(2, strategy, f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
    model = _model()
    x, y = _data()
    ((model(x) - y) ** 2).mean().backward()
    got = torch.load(out, weights_only=True)
    for p, g in zip(model.parameters(), got):
        assert torch.allclose(p.grad, g, atol=1e-6), (p.grad, g)


def test_one_process_is_unchanged():
    batches, weights = dist_utils.even_micro_batches(["a", "b"], dist_utils.Context())
    assert (batches, weights) == (["a", "b"], [1.0, 1.0])
