"""How far bitsandbytes quantization moves a weight's fingerprint (checkpoint.FINGERPRINT_TOL_QUANT).

    python scripts/fingerprint_quant.py            # a table, a few seconds on one CPU thread

For each weight distribution and shape, the fingerprint distance (runtime.fingerprint_distance)
between the float weight and its nf4 / fp4 / int8 version (dequantized, as load sees it), the
relative Frobenius error of that version, and the distance between two unrelated weights of
the same distribution (what a wrong base looks like). Weights: N(0, 0.02) as LLM inits,
nn.Linear's kaiming-uniform init, and a heavy-tailed Student t (3 dof) scaled to std 0.02,
which has the outliers real LLM weights have.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_lite.runtime import base_weight, fingerprint_distance, weight_fingerprint
from lora_lite.testing import quantize

SHAPES = [(64, 64), (64, 128), (256, 256), (512, 1024)]
SEEDS = range(1, 6)
KINDS = ["int8", "nf4", "fp4"]


def draw(kind: str, o: int, i: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return 0.02 * torch.randn(o, i, generator=g)
    if kind == "kaiming":
        bound = 1 / i**0.5
        return (torch.rand(o, i, generator=g) * 2 - 1) * bound
    torch.manual_seed(seed)
    t = torch.distributions.StudentT(3.0).sample((o, i))  # heavy tails, like real LLM weights
    return 0.02 * t / t.std()


def quantized_weight(W: torch.Tensor, kind: str) -> torch.Tensor:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data.copy_(W)
    holder = quantize(nn.ModuleDict({"layer": lin}), kind)
    return base_weight(holder["layer"])


def stats(v: list[float]) -> str:
    t = torch.tensor(v)
    return f"{t.min():6.3f} {t.median():6.3f} {t.max():6.3f}"


def main() -> None:
    print(f"{len(SHAPES)} shapes x {len(SEEDS)} seeds per row; min / median / max")
    print(f"{'weights':9} {'kind':9} {'relative weight error':>22}   {'fingerprint distance':>22}")
    overall: dict[str, list[float]] = {}
    for dist in ["normal", "kaiming", "student_t"]:
        rows: dict[str, tuple[list, list]] = {k: ([], []) for k in KINDS + ["unrelated"]}
        for o, i in SHAPES:
            for seed in SEEDS:
                W = draw(dist, o, i, seed)
                fp = weight_fingerprint(W)
                for k in KINDS:
                    Wq = quantized_weight(W, k)
                    rows[k][0].append(float((Wq - W).norm() / W.norm()))
                    rows[k][1].append(fingerprint_distance(weight_fingerprint(Wq), fp))
                for other in range(4):  # unrelated weights of the same distribution and shape
                    W2 = draw(dist, o, i, 1000 * seed + other)
                    rows["unrelated"][0].append(float((W2 - W).norm() / W.norm()))
                    rows["unrelated"][1].append(fingerprint_distance(weight_fingerprint(W2), fp))
        for k, (err, fpd) in rows.items():
            print(f"{dist:9} {k:9} {stats(err):>22}   {stats(fpd):>22}")
            overall.setdefault(k, []).extend(fpd)
    print("fingerprint distance over all rows (min / median / max):")
    for k, v in overall.items():
        print(f"  {k:9} {stats(v)}")


if __name__ == "__main__":
    main()
