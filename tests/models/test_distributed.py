"""Data-parallel training on 2 CPU processes (gloo, loopback) equals one process on the global batch.

One spawn runs both wrappers in turn: DistributedDataParallel, then FSDP2's ``fully_shard`` (one
unit per block plus the root). Each rank takes half of the global batch; after 3 AdamW steps the
parameters must equal those of a single process that saw the whole batch.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from multihead_sdpadiff import DiffTransformer

CFG = {"vocab_size": 32, "embed_dim": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "max_seq_len": 16}
WORLD, STEPS, BATCH, LENGTH = 2, 3, 4, 12


def make_model():
    torch.manual_seed(0)
    return DiffTransformer(dtype=torch.float64, **CFG)


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 32, (BATCH, LENGTH), generator=g) for _ in range(STEPS)]


def train(model, data, rank=0, world=1):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    share = BATCH // world
    for ids in data:
        ids = ids[rank * share : (rank + 1) * share]
        # Every rank holds the same number of tokens, so the mean of the ranks' mean losses
        # (what averaging gradients computes) is the global mean loss.
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A file rendezvous in the test's own folder: no port to race for on a busy machine.
    store = os.path.join(out_dir, "rendezvous")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        from torch.nn.parallel import DistributedDataParallel

        model = make_model()
        train(DistributedDataParallel(model), batches(), rank, WORLD)
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(out_dir, "ddp.pt"))

        from torch.distributed.fsdp import fully_shard

        model = make_model()
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        train(model, batches(), rank, WORLD)
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(full, os.path.join(out_dir, "fsdp2.pt"))
        dist.barrier()  # both ranks done with every collective before either tears gloo down
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_and_fsdp2_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, batches())
    want = model.state_dict()
    assert any(not torch.equal(before[k], want[k]) for k in want)  # training moved something
    for name in ("ddp", "fsdp2"):
        got = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=f"{name}: {k}")
