"""DDP and FSDP2 on 2 processes (gloo, CPU): the adapter trains as on one process with the whole
batch, stays equal across ranks, and a checkpoint saved through the wrapper reloads anywhere."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lora_lite as ll
from conftest import lm_loss, logits, make_model, small_cfg, token_batch
from lora_lite.wrappers import full

RUNS = [("ddp", "pissa"), ("fsdp2", "pissa"), ("fsdp2", "dora")]
STEPS, WORLD = 3, 2


def build(spec: str):
    model = make_model()
    torch.manual_seed(1)  # the same adapter init on every rank and in the reference
    ll.attach(model, small_cfg(spec))
    return model


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block)
    return fully_shard(model)


def train(model, rank: int = 0, world: int = 1) -> None:
    """AdamW steps; each rank takes its slice of the same 4-row batches."""
    opt = torch.optim.AdamW(ll.trainable_parameters(model), lr=1e-2)
    for step in range(STEPS):
        batch = token_batch(seed=10 + step, batch=4)
        rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
        lm_loss(model, {k: v[rows] for k, v in batch.items()}).backward()
        opt.step()
        opt.zero_grad()


def adapter(model) -> dict:
    st = ll.state(model)
    return {f"{n}.{k}": full(getattr(t.module, k)).detach().clone() for n, t in st.targets.items() for k in t.tensors}


def worker(rank: int, folder: str) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        for mode, spec in RUNS:
            tag = f"{folder}/{mode}-{spec}"
            model = build(spec)
            wrapped = torch.nn.parallel.DistributedDataParallel(model) if mode == "ddp" else shard(model)
            train(wrapped, rank, WORLD)
            torch.save(adapter(model), f"{tag}-rank{rank}.pt")
            out = logits(wrapped)  # FSDP2: every rank runs the forward
            if mode == "fsdp2" or rank == 0:  # DDP: save on rank 0 as usual; FSDP2: all ranks gather
                ll.save(wrapped, f"{tag}.safetensors")
            dist.barrier()
            if mode == "fsdp2":  # a sharded state_dict holds the base W, not a cropped W_res
                name = next(iter(ll.state(model).targets))
                w = full(wrapped.state_dict()[f"{name}.weight"])
                assert (w - make_model().get_submodule(name).weight).abs().max() < 1e-5, "sharded state_dict"
            if mode == "fsdp2":  # load into an already sharded model
                fresh = shard(make_model())
                ll.load(fresh, f"{tag}.safetensors")
                assert torch.equal(logits(fresh), out), "load into a sharded model"
            if rank == 0:
                torch.save(out, f"{tag}-logits.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    mp.start_processes(worker, args=(str(folder),), nprocs=WORLD, start_method="spawn")
    return folder


@pytest.mark.parametrize("mode, spec", RUNS)
def test_two_ranks_train_as_one_process_on_the_whole_batch(ranks, mode, spec):
    tag = ranks / f"{mode}-{spec}"
    r0, r1 = (torch.load(f"{tag}-rank{r}.pt") for r in range(WORLD))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)  # equal across ranks
    reference = build(spec)
    train(reference)
    want = adapter(reference)
    assert max((r0[k] - want[k]).abs().max().item() for k in want) <= 1e-5
    assert max((want[k] - adapter(build(spec))[k]).abs().max().item() for k in want) > 1e-3  # it trained


@pytest.mark.parametrize("mode, spec", RUNS)
def test_checkpoint_saved_through_the_wrapper_loads_in_a_fresh_process(ranks, mode, spec):
    tag = ranks / f"{mode}-{spec}"
    model = ll.load(make_model(), f"{tag}.safetensors")
    assert torch.equal(logits(model), torch.load(f"{tag}-logits.pt"))
