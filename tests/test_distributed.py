import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import magprune


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prune_on_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different weights on each rank: rank 0's masks must win
        model = magprune.create_model("lenet-300-100")
        pruner = magprune.Pruner(model)
        pruner.prune(magprune.GlobalSparsity(0.9))
        torch.save({"masks": pruner.masks, "weights": {n: p.detach() for n, p in pruner.params.items()}},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_masks_are_broadcast_from_rank_0(tmp_path):
    mp.spawn(_prune_on_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    torch.manual_seed(1)
    own = magprune.Pruner(magprune.create_model("lenet-300-100"))
    own.prune(magprune.GlobalSparsity(0.9))
    for name, mask in r0["masks"].items():
        assert torch.equal(r1["masks"][name], mask)
        assert not r1["weights"][name][~mask].any()
    assert any(not torch.equal(own.masks[n], r1["masks"][n]) for n in own.masks), "rank 1 alone would differ"
