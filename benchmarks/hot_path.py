"""Hot-path costs (issue 7's last target): each generated forward as it is now, next to a proposed
formulation of the same math, on one Qwen3-0.6B-shaped q_proj (1024 -> 2048, no bias).

    python benchmarks/hot_path.py                    # CPU, 2 x 256 tokens, 1 thread recommended
    python benchmarks/hot_path.py --device cuda --tokens 2048

Each case times forward + backward of the whole layer (the base linear, the adapter, a sum loss;
x requires grad as an activation mid-model would), median of --iters interleaved repetitions,
and counts the bytes autograd saves for backward. "now" runs the layer with lora-lite's hook
(whatever generated/ and runtime.py hold in this checkout); "proposed" computes the same output
from the same tensors in plain PyTorch. Every case first checks that both agree (rtol 1e-4 in fp32,
2e-2 in bf16). A script, not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import lora_lite as ll

D_IN, D_OUT = 1024, 2048


class One(nn.Module):
    """A single target, named as in a transformer so the spec's defaults would also find it."""

    def __init__(self, dtype):
        super().__init__()
        self.q_proj = nn.Linear(D_IN, D_OUT, bias=False, dtype=dtype)


def attached(spec: str, dtype, adapter_dtype, **over) -> nn.Linear:
    torch.manual_seed(0)
    model = One(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ll.attach(model, ll.from_spec(spec, target_names=("q_proj$",), dtype=adapter_dtype, **over), progress=False)
    m = model.q_proj
    with torch.no_grad():  # move every trainable tensor off its init so the math is exercised
        for name, p in m.named_parameters():
            if name.startswith("lora_"):
                p.add_(0.05 * torch.randn_like(p))
    return m


# --- proposed formulations (same tensors, same math) --------------------------------------------


def lora_addmm(m, x, s):
    """y + s (x A^T) B^T with the scale and the add fused into one GEMM (no (tokens, o) temporary)."""
    y = F.linear(x, m.weight)
    h = x @ m.lora_A.T
    return torch.addmm(y.flatten(0, -2), h.flatten(0, -2), m.lora_B.T, alpha=s).view_as(y)


def delora_folded(m, x, r):
    """w_norm folded into A's r rows, not applied to every token of x."""
    y = F.linear(x, m.weight)
    a_norm = torch.linalg.vector_norm(m.lora_A, dim=1).clamp_min(1e-4)
    b_norm = torch.linalg.vector_norm(m.lora_B, dim=0).clamp_min(1e-4)
    g = m.lora_lambda / r / (a_norm * b_norm)
    h = x @ (m.lora_A * m.lora_w_norm).T
    return torch.addmm(y.flatten(0, -2), (h * g).flatten(0, -2), m.lora_B.T).view_as(y)


def dora_cached(m, x, s, w_sq):
    """||W_i + s (BA)_i||^2 = ||W_i||^2 (cached) + 2 s B_i (W A^T)_i + s^2 B_i (A A^T) B_i^T; W used in
    its own dtype (no fp32 copy); no bias arithmetic when the layer has none."""
    y = F.linear(x, m.weight)
    A, B = m.lora_A, m.lora_B
    lora = s * ((x @ A.T) @ B.T)
    with torch.no_grad():
        WAt = F.linear(A.to(m.weight.dtype), m.weight).T.float()  # (o, r)
        Af, Bf = A.float(), B.float()
        sq = w_sq + 2 * s * (WAt * Bf).sum(1) + s * s * ((Bf @ (Af @ Af.T)) * Bf).sum(1)
        norm = sq.clamp_min(0).sqrt()
    scale = m.lora_magnitude_vector / norm.to(x.dtype)
    return scale * (y + lora)


def ia3_no_input_cast(m, x):
    """IA3 (output gain) never reads x: no cast of x to the adapter dtype; the (o,) gain is cast instead."""
    return F.linear(x, m.weight) * m.lora_ia3.to(x.dtype)


def ia3_ff_vector_cast(m, x):
    """IA3-FF input gain: cast the (i,) gain to x's dtype, not x to the gain's and back."""
    return F.linear(x * m.lora_ia3.to(x.dtype), m.weight)


def spectral_folded(m, x, SVh):
    """AntiPaSTO-ablate's S-scaled coordinates with S folded into Vh once (a frozen product)."""
    y = F.linear(x, m.weight)
    h = x @ SVh.T  # == (x Vh^T) * S
    Chat, _ = torch.linalg.qr(m.lora_c.float())
    Chat = Chat.to(h.dtype)
    strength = torch.sigmoid(m.lora_strength_logit)
    h = h - ((h @ Chat) * strength) @ Chat.T
    return torch.addmm(y.flatten(0, -2), h.flatten(0, -2), m.lora_U.T).view_as(y)


def hra_addmm(m, x, r):
    """HRA's x - ((x V) T^T) V^T with the subtraction fused into the last GEMM."""
    V = m.lora_hra_u / torch.linalg.vector_norm(m.lora_hra_u, dim=0)
    Vw = V.to(torch.promote_types(V.dtype, torch.float32))
    eye = torch.eye(r, dtype=Vw.dtype, device=V.device)
    T = torch.linalg.solve_triangular(torch.triu(Vw.T @ Vw, diagonal=1) + 0.5 * eye, eye, upper=True).to(V.dtype)
    x2 = x.flatten(0, -2)
    xn = torch.addmm(x2, (x2 @ V) @ T.T, V.T, alpha=-1).view_as(x)
    return F.linear(xn.to(m.weight.dtype), m.weight)


# --- measurement --------------------------------------------------------------------------------


def saved_bytes(fn, x) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x).float().sum()
    return sum(seen.values())


def fwd_bwd(fn, x, sync) -> float:
    x.grad = None
    sync()
    t0 = time.perf_counter()
    fn(x).float().sum().backward()
    sync()
    return time.perf_counter() - t0


def cases(dtype, adapter_dtype, r: int):
    """(name, module, now, proposed, what the proposal removes)."""
    out = []
    m = attached("lora", dtype, adapter_dtype, r=r, alpha=2.0 * r)
    out.append(("lora", m, m, lambda x, m=m: lora_addmm(m, x, 2.0), "s (h B^T) and the add: 2 passes over (tokens, o)"))
    m = attached("delora", dtype, adapter_dtype, r=r)
    out.append(("delora", m, m, lambda x, m=m: delora_folded(m, x, r), "x * w_norm: a pass + a saved (tokens, i)"))
    m = attached("dora", dtype, adapter_dtype, r=r, alpha=2.0 * r)
    w_sq = m.weight.detach().float().square().sum(1)
    out.append(
        ("dora", m, m, lambda x, m=m: dora_cached(m, x, 2.0, w_sq), "||W_i||^2 reduced each call (cached before)")
    )
    m = attached("ia3", dtype, adapter_dtype)
    out.append(("ia3", m, m, lambda x, m=m: ia3_no_input_cast(m, x), "cast of x to the adapter dtype, unused"))
    m = attached("ia3_ff", dtype, adapter_dtype)
    out.append(("ia3_ff", m, m, lambda x, m=m: ia3_ff_vector_cast(m, x), "x cast to the adapter dtype and back"))
    m = attached("antipasto_ablate", dtype, adapter_dtype, r=256)
    SVh = (m.lora_Vh * m.lora_S[:, None]).detach()
    out.append(("antipasto_ablate", m, m, lambda x, m=m: spectral_folded(m, x, SVh), "(x Vh^T) * S each call"))
    m = attached("hra", dtype, adapter_dtype, r=r)
    out.append(("hra", m, m, lambda x, m=m: hra_addmm(m, x, r), "the (tokens, i) subtraction, fused"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", default="float32", help="model (layer) dtype")
    ap.add_argument("--adapter-dtype", help="default: the model's (float32 with --dtype bfloat16: PEFT's default)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--only", help="comma-separated case names")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = ll.config.as_dtype(a.dtype)
    adapter_dtype = ll.config.as_dtype(a.adapter_dtype or a.dtype)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    torch.set_default_device(dev)
    tol = 1e-4 if dtype == adapter_dtype == torch.float32 else 2e-2
    print(
        f"q_proj {D_IN} -> {D_OUT}, {a.tokens} tokens, layer {dtype}, adapter {adapter_dtype}, r={a.r}, {dev} "
        f"({torch.get_num_threads()} threads); forward + backward of the layer, median of {a.iters}"
    )
    print(f"{'case':<18}{'now ms':>9}{'proposed ms':>13}{'saved':>8}{'now MB':>9}{'prop MB':>9}  removes")
    only = set(a.only.split(",")) if a.only else None
    if dtype != adapter_dtype:  # the proposals below assume one dtype except the IA3 ones, about casts
        only = (only or {"ia3", "ia3_ff"}) & {"ia3", "ia3_ff"}
    for name, m, now, proposed, what in cases(dtype, adapter_dtype, a.r):
        if only and name not in only:
            continue
        x = torch.randn(a.tokens, D_IN, dtype=dtype, requires_grad=True)
        with torch.no_grad():
            ref, got = now(x).float(), proposed(x).float()
        err = float((ref - got).abs().max() / ref.abs().max())
        assert err < tol, f"{name}: proposed differs from now by {err:.2e}"
        times = {"now": [], "proposed": []}
        for i in range(3 + a.iters):
            for k, fn in (("now", now), ("proposed", proposed)) if i % 2 else (("proposed", proposed), ("now", now)):
                t = fwd_bwd(fn, x, sync)
                if i >= 3:
                    times[k].append(t)
        t_now, t_prop = (1e3 * statistics.median(times[k]) for k in ("now", "proposed"))
        mb_now, mb_prop = (saved_bytes(fn, x) / 2**20 for fn in (now, proposed))
        print(
            f"{name:<18}{t_now:>9.2f}{t_prop:>13.2f}{100 * (1 - t_prop / t_now):>7.0f}%"
            f"{mb_now:>9.1f}{mb_prop:>9.1f}  {what}"
        )


if __name__ == "__main__":
    main()
