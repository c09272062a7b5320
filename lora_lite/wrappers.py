"""Models as training frameworks hand them back, and sharded (FSDP2) tensors.

Every public function that takes a model (attach, detach, state, set_coeff, save, load, ...)
calls unwrap() first, so it accepts the model itself or any of:

    torch.compile(model)                          OptimizedModule, the model in ._orig_mod
    DistributedDataParallel(model), DataParallel  the model in .module
    accelerator.prepare(model)                    one of the above, or the model itself
    fully_shard(model)  (FSDP2)                   the model itself; its parameters are DTensors

The adapter's state lives on the unwrapped model, so a wrapper built before or after attach
sees the same adapter. FSDP2 shards every parameter, the adapter's too (attach before
fully_shard so they are sharded and their gradients reduced): `full` gathers one tensor
(a collective: every rank calls it), `shard_like` shards a full value as another tensor is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

try:  # torch.distributed is optional in some builds
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    dist, DTensor, distribute_tensor = None, (), None

DATA_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def unwrap_once(model: nn.Module) -> nn.Module:
    """The module one wrapper holds, or `model` when it is no wrapper lora-lite knows."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return model._orig_mod
    if data_parallel(model):
        return model.module
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside any torch.compile / DDP / DataParallel / DeepSpeed wrappers (nested
    in any order); the model itself when it is not wrapped. FSDP2 needs no unwrapping."""
    while (inner := unwrap_once(model)) is not model:
        model = inner
    return model


def data_parallel(model: nn.Module) -> bool:
    """True for a DDP, DataParallel or DeepSpeed wrapper (they hold the model in `.module`)."""
    return isinstance(model, DATA_PARALLEL) or type(model).__name__ == "DeepSpeedEngine"


def wraps_data_parallel(model: nn.Module) -> bool:
    """True when a data-parallel wrapper is anywhere in the chain unwrap() peels: it
    synchronises only the parameters it saw when it was built."""
    while not data_parallel(model) and (inner := unwrap_once(model)) is not model:
        model = inner
    return data_parallel(model)


def is_sharded(t: Tensor) -> bool:
    """True for a DTensor (an FSDP2 / tensor-parallel parameter)."""
    return isinstance(t, DTensor)


def full(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor is all-gathered (every rank must call), anything else returned."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(value: Tensor, ref: Tensor) -> Tensor:
    """`value`, a full tensor, laid out as `ref`: sharded the same way when ref is a DTensor
    (each rank keeps its shard; every rank must call), else returned as it is."""
    if isinstance(ref, DTensor):
        return distribute_tensor(value, ref.device_mesh, ref.placements)
    return value


def is_writer() -> bool:
    """False on the ranks other than 0 of an initialised process group; True otherwise."""
    return dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0
