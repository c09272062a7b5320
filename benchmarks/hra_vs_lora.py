"""Micro-benchmark: HRA's forward+backward time and memory next to LoRA's, ours and PEFT's.

    python benchmarks/hra_vs_lora.py                       # CPU, 4 layers, 4 x 256 tokens
    python benchmarks/hra_vs_lora.py --device cuda --layers 28 --batch 8 --seq 512

A stack of Qwen3-0.6B-shaped attention projections (q_proj 1024 -> 2048, v_proj 1024 -> 1024
per layer, chained through a residual so gradients cross every layer), r = 32 on q and v, fp32.
For each adapter: median wall time of forward + backward over --iters steps (after warm-up;
the adapters take turns, so load from other processes hits them alike),
the bytes autograd saves for backward (activation memory, exact on any device), and on CUDA the
peak allocated memory above the model's own. A script, not a test: timings depend on the machine.

Ours applies HRA's r reflections in compact WY form (x - ((x V) T^T) V^T, O(tokens d r)); PEFT
forms the dense (d, d) product of the reflections and W @ it on every call.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

import lora_lite as ll

D, Q_OUT, KV_OUT = 1024, 2048, 1024


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D, Q_OUT, bias=False)
        self.v_proj = nn.Linear(D, KV_OUT, bias=False)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attn()


class Stack(nn.Module):
    """x (B, T, 1024) -> x + 0.01 (q[..., :1024] + v) per layer; a loss-ready stand-in for attention."""

    def __init__(self, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            a = layer.self_attn
            x = x + 0.01 * (a.q_proj(x)[..., :D] + a.v_proj(x))
        return x


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one forward (activation memory), without duplicates."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).square().mean()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


def step(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds for one forward + backward."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    model.zero_grad(set_to_none=True)
    x.grad = None
    sync()
    t0 = time.perf_counter()
    model(x).square().mean().backward()
    sync()
    return time.perf_counter() - t0


def peak_mb(model: nn.Module, x: torch.Tensor) -> float | None:
    """CUDA only: peak allocated memory of one forward + backward above what was allocated before."""
    if x.device.type != "cuda":
        return None
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model(x).square().mean().backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench(models: dict[str, nn.Module], x: torch.Tensor, iters: int, warmup: int = 2) -> dict[str, dict]:
    """Median step time per model, the models interleaved so machine load hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + iters):
        for name, model in models.items():
            t = step(model, x)
            if i >= warmup:
                times[name].append(t)
    return {
        name: {
            "ms": 1e3 * statistics.median(times[name]),
            "saved_mb": saved_bytes(model, x) / 2**20,
            "peak_mb": peak_mb(model, x),
        }
        for name, model in models.items()
    }


def variants(base: nn.Module, r: int) -> dict[str, nn.Module]:
    out = {"base (no adapter)": base}
    for name in ("lora", "hra"):
        m = copy.deepcopy(base)
        ll.attach(m, ll.from_spec(name, r=r))
        out[f"lora-lite {name}"] = m
    try:
        import peft
    except ImportError:
        print("(peft not installed: PEFT rows skipped)")
        return out
    for name, cfg in (
        ("lora", peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"])),
        ("hra", peft.HRAConfig(r=r, target_modules=["q_proj", "v_proj"])),
    ):
        m = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = peft.inject_adapter_in_model(cfg, m)
        out[f"PEFT {name}"] = m
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    base = Stack(args.layers).to(dev)
    for p in base.parameters():
        p.requires_grad_(False)
    x = torch.randn(args.batch, args.seq, D, device=dev, requires_grad=True)  # as a hidden state mid-model
    print(
        f"{args.layers} layers of q_proj {D}->{Q_OUT} and v_proj {D}->{KV_OUT}, r={args.r}, "
        f"{args.batch}x{args.seq} tokens, fp32, {dev} ({torch.get_num_threads()} CPU threads)"
    )
    cols = "forward+backward ms   saved for backward MB" + ("   peak MB" if dev.type == "cuda" else "")
    print(f"{'adapter':<20}{cols}")
    results = bench(variants(base, args.r), x, args.iters)
    for name, res in results.items():
        peak = f"{res['peak_mb']:>10.1f}" if res["peak_mb"] is not None else ""
        print(f"{name:<20}{res['ms']:>18.1f}{res['saved_mb']:>24.1f}{peak}")
    if "PEFT hra" in results:
        ours, theirs = results["lora-lite hra"]["ms"], results["PEFT hra"]["ms"]
        lora = results["lora-lite lora"]["ms"]
        print(f"HRA / LoRA time: lora-lite {ours / lora:.2f}x, PEFT {theirs / results['PEFT lora']['ms']:.2f}x")


if __name__ == "__main__":
    main()
