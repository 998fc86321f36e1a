"""Several processes (torchrun): where this one sits, how the global batch splits, DDP or FSDP.

``Dist`` is the process's rank and world; ``init_distributed`` joins the job torchrun started.
``split_batch`` keeps the global batch (batch_size x grad_accum) whatever the number of processes,
so a run resumes on another number of GPUs with the same loss curve. ``wrap_model`` makes the
model DDP or FSDP2; ``full_state`` / ``load_full_state`` move whole (unsharded) weights and optimizer
state in and out, so rank 0 writes one checkpoint format whichever was used. Used by training;
imports no stage after it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from slmkit.errors import SlmError
from slmkit.model import GPT
from slmkit.runtime import resolve_device


@dataclass
class Dist:
    """Where this process sits in a torchrun job; the defaults are a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs and plots."""
        return self.rank == 0

    def all_mean(self, values: list[float]) -> list[float]:
        """The mean of ``values`` over all ranks, the same on every rank (identity on one process)."""
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def leave_distributed(dist: Dist) -> None:
    """Destroy the process group ``init_distributed`` joined (nothing for one process). Free DDP's
    reducer first: it holds the group too. gloo's worker thread drops its last references to
    finished collectives after they complete, which takes the GIL, and destroying the group joins
    that thread while holding the GIL, so a rank could hang at exit; a short sleep gives the thread
    the GIL before the group goes."""
    if dist.world_size > 1:
        import time

        import torch.distributed

        time.sleep(0.2)
        torch.distributed.destroy_process_group()


def init_distributed(device_name: str = "auto") -> Dist:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE, ...):
    NCCL on GPUs, gloo on CPUs. Without torchrun this returns the single-process ``Dist()``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, setting="train.device={}")
    if device == "cuda":
        torch.cuda.set_device(local)  # so that "cuda" means this rank's GPU everywhere below
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(rank, world, local)


def split_batch(batch_size: int, grad_accum: int, world_size: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) per rank for a global batch of batch_size x grad_accum.

    The global batch is the same whatever the number of processes, so a run's loss curve and its
    data order do not depend on it, and a run resumes on another number of processes. Ranks share
    the accumulation steps first (keeping each matmul as large as configured), then the micro-batch.
    """
    if grad_accum % world_size == 0:
        return batch_size, grad_accum // world_size
    if batch_size % world_size == 0:
        return batch_size // world_size, grad_accum
    raise SlmError(
        f"{world_size} processes cannot share a global batch of train.batch_size={batch_size} x "
        f"train.grad_accum={grad_accum}: make one of them a multiple of {world_size}"
    )


def wrap_model(model: GPT, parallel: str, dist: Dist, device: str) -> torch.nn.Module:
    """Move ``model`` (built on the CPU) to ``device``; return the module that runs the training
    forward and backward on this rank.

    One process: the model itself. ``ddp``: a DistributedDataParallel wrapper around the model,
    which stays whole on every rank. ``fsdp``: the model itself, sharded in place by FSDP2's
    ``fully_shard``, each block on its own and then the root (embeddings, final norm, head). Its
    parameters become DTensors, so make the optimizer after this.
    """
    if dist.world_size == 1:
        return model.to(device)
    if parallel == "ddp":
        ids = [dist.local_rank] if device == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model.to(device), device_ids=ids)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise SlmError(f"train.parallel=fsdp needs torch 2.6 or newer (FSDP2), this is {torch.__version__}: "
                       "upgrade torch or use train.parallel=ddp") from None
    # No MixedPrecisionPolicy: the parameters are all-gathered in float32 and the usual autocast
    # casts them for the matmuls, so the arithmetic is that of one GPU or DDP (bf16 parameters would
    # also make the embeddings, norms and residual stream bf16). The cost: twice the all-gather
    # traffic, and twice the memory for the gathered weights, of bf16 parameters.
    # Each fully_shard moves its part to the GPU and shards it there, so the whole model is never on
    # one GPU (only in each process's CPU memory, while it is built).
    for block in model.blocks:
        fully_shard(block)
    # The root takes what is left. Tied embeddings stay one parameter: tok_emb and lm_head both
    # belong to the root, so the head's weight is tok_emb's, gathered once.
    fully_shard(model)
    return model


def is_fsdp(model: torch.nn.Module) -> bool:
    """Whether ``model`` has been sharded by ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch before 2.6, or built without torch.distributed: no FSDP at all
        return False
    return isinstance(model, FSDPModule)


def grad_sync(net: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Reduce gradients across ranks in this backward only when ``sync``: off for all micro-batches
    of a step but the last, as DDP's ``no_sync`` and FSDP's ``set_requires_gradient_sync`` do."""
    if is_fsdp(net):
        net.set_requires_gradient_sync(sync)
    elif isinstance(net, torch.nn.parallel.DistributedDataParallel) and not sync:
        return net.no_sync()
    return contextlib.nullcontext()


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in the order that ``optimizer.state_dict()`` numbers them."""
    names = {p: n for n, p in model.named_parameters()}  # a tied weight once, under its first name
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def _rekey(osd: dict[str, Any], key: dict[Any, Any]) -> dict[str, Any]:
    """An optimizer state dict with each parameter id (index or name) replaced by ``key[id]``."""
    return {"state": {key[k]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [key[k] for k in g["params"]]} for g in osd["param_groups"]]}


def full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The model's and optimizer's state dicts as a checkpoint holds them: whole tensors, and the
    optimizer state numbered by parameter index as ``optimizer.state_dict()`` numbers it.

    Under FSDP this gathers the shards into rank 0's CPU memory, one tensor at a time: every rank
    must call it, and ranks other than 0 get empty dicts.
    """
    if not is_fsdp(model):
        return model.state_dict(), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    # Before the first step there is no state to gather (and DCP would take a zero step to make some).
    if optimizer is None or not optimizer.state:
        return weights, optimizer.state_dict() if optimizer is not None else None
    osd = get_optimizer_state_dict(model, optimizer, options=options)  # keyed by parameter name
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return weights, _rekey(osd, index) if osd else {}


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any] | None) -> None:
    """Load whole state dicts (as ``full_state`` returns them) into a model that may be sharded.

    Every rank passes the whole checkpoint (each reads the file, as with DDP), and under FSDP
    keeps only its shard of each tensor. Neither the layout nor the number of processes that
    wrote the checkpoint matters.
    """
    if not is_fsdp(model):
        model.load_state_dict(weights)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    if optimizer_state is None:
        return
    if not optimizer_state["state"]:  # written before the first step: nothing to shard
        optimizer.load_state_dict(optimizer_state)
        return
    names = dict(enumerate(_param_names(model, optimizer)))
    set_optimizer_state_dict(model, optimizer, _rekey(optimizer_state, names), options=options)
