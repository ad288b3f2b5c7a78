"""Data-parallel training over processes: `torchrun --nproc_per_node N -m lamflow.workflows.cli train ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `setup` joins the process group (NCCL on GPUs, one
per process, gloo on CPUs). The Trainer then, when world > 1:
- broadcasts rank 0's weights and buffers (statistics included) and sampler stream, so all
  ranks start identical;
- shards every training set: all ranks draw the SAME global batch (same seed, same task, same
  sampler stream) of world x batch_size frames and rank r keeps frames r::world. The global
  batch is therefore exactly what one process with batch_size x world would draw;
- averages gradients after each backward (`GradAllReduce`), then every rank takes the same
  Adam step. DistributedDataParallel is not used: our forces come from autograd.grad with
  create_graph=True inside the loss, whose double backward the DDP reducer handles only
  partially; one all-reduce of the .grad tensors after backward is simple and exact;
- writes checkpoints, lcurve and logs on rank 0 only.
With `learning_rate.scale_by_worker` (deepmd-kit's key, default "linear") the learning rate is
multiplied by world (or sqrt(world)); set it to "none" to reproduce a one-process run.
"""

from __future__ import annotations

import atexit
import os

import numpy as np
import torch

from lamflow.model.data.batch import DataSet
from lamflow.model.io.checkpoint import resolve_device


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def setup(device: str = "auto") -> tuple[int, int, torch.device]:
    """Join the process group when launched by torchrun. Returns (rank, world, device)."""
    rank, world, local = world_from_env()
    if world == 1:
        return 0, 1, resolve_device(device)
    import torch.distributed as dist

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return rank, world, torch.device(f"cuda:{local}") if cuda else torch.device("cpu")


def lr_scale(scale_by_worker: str, world: int) -> float:
    return {"linear": float(world), "sqrt": float(np.sqrt(world)), "none": 1.0}[scale_by_worker]


class ShardedDataSet(DataSet):
    """A DataSet whose `pick` returns this rank's share of a global batch (see module docstring).
    Built from an existing DataSet, sharing its systems."""

    def __init__(self, base: DataSet, rank: int, world: int):
        self.__dict__.update(base.__dict__)
        self.rank, self.world = rank, world
        self.set_batch_sizes([b * world for b in base.batch_sizes])  # global batch per system

    def pick(self, rng: np.random.Generator) -> tuple[int, list[int]]:
        # the same draw as DataSet.pick with the global batch size, on every rank
        i, picks = self.draw(rng)
        mine = picks[self.rank :: self.world] or [picks[self.rank % len(picks)]]  # a system smaller than world: repeat a frame
        return i, mine


def sync_rng(rng: np.random.Generator) -> None:
    """Give every rank rank 0's sampler stream (it already has it when training.seed is set; without
    a seed each process would draw its own tasks and batches)."""
    import torch.distributed as dist

    state = [rng.bit_generator.state]
    dist.broadcast_object_list(state, src=0)
    rng.bit_generator.state = state[0]


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (in place)."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


class GradAllReduce:
    """Trainer step hook: average .grad over ranks after backward. Parameters without a gradient
    on every rank (the heads of tasks not drawn this step) keep grad None, so Adam leaves them
    alone exactly as in a one-process run."""

    def __init__(self, module: torch.nn.Module, world: int):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.world = world

    def __call__(self, step: int, task, loss) -> None:
        import torch.distributed as dist

        if not self.params:
            return
        dev = self.params[0].device
        has = torch.tensor([float(p.grad is not None) for p in self.params], device=dev)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        live = [p for p, h in zip(self.params, has.tolist()) if h > 0]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for dtype in {p.dtype for p in live}:  # one flat all-reduce per dtype
            group = [p for p in live if p.dtype == dtype]
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat)
            flat /= self.world
            k = 0
            for p in group:
                n = p.numel()
                p.grad.copy_(flat[k : k + n].view_as(p))
                k += n
