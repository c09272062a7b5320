"""Trainable parameter counts and CPU attach time of every shipped spec on a Qwen3-0.6B shape.

    python scripts/param_counts.py                      # all shipped specs, 28 layers (minutes)
    python scripts/param_counts.py antipasto lora       # some specs
    python scripts/param_counts.py --layers 2           # quick look (counts scale with layers)
    python scripts/param_counts.py road lokr --peft     # beside PEFT's count on the same shape

The model is transformers' Qwen3Model (no LM head) built from a Qwen3Config with the 0.6B
shape and random weights, so nothing is downloaded: hidden 1024, 28 layers, 16 query heads and
8 key/value heads of 128 (q_proj 1024 -> 2048, k/v_proj 1024 -> 1024), MLP 3072. Counts need
no real weights; attach time does depend on the shape only (full fp32 SVD per target).

Ranks follow upstream's table: r=256 for the AntiPaSTO family (spectral cores: gain, ablate,
arrow), r=32 for the other specs with a rank (the LoRA family, HRA), PEFT's defaults for the
methods with their own PEFT config (LoHa, LoKr, OFT, BOFT, RoAd, VeRA: r=256), each spec's default
targets. Specs that use calibration data get 4 x 512 random tokens (at least d_in = 1024 per target, as CorDA needs).
Not part of the test suite: 56 full SVDs take minutes on 2 CPU cores. On a shared machine run
it with OMP_NUM_THREADS=1: OpenMP threads competing with another process for the same cores
spin and made the 2-thread timings here swing by 5x.
"""

from __future__ import annotations

import argparse
import time

import torch

import lora_lite as ll
from lora_lite.codegen.spec import load_spec, shipped_specs_dir

SPECTRAL = {"gain", "ablate", "arrow"}
OWN_DEFAULTS = {"boft", "loha", "lokr", "oft", "road", "vera"}  # own PEFT config: its defaults, r included
# Trainable counts in the upstream README / design table (q, v unless the spec says otherwise).
UPSTREAM = {
    "lora": 4_587_520,
    "pissa": 4_587_520,
    "dora": 4_673_536,
    "delora": 4_587_576,
    "antipasto": 14_336,
    "antipasto_corda": 14_336,
    "antipasto_ablate": 14_392,
    "antipasto_arrow": 17_472,
    "ia3": 57_344,
    "ia3_ff": 86_016,
    "eva": 4_587_520,
    "hra": 1_835_008,
}


def peft_configs() -> dict:
    """spec -> PEFT config with PEFT's defaults for the method (r=32 for the LoRA family), q and v."""
    import peft

    qv = ["q_proj", "v_proj"]
    return {
        "lora": peft.LoraConfig(r=32, target_modules=qv),
        "road": peft.RoadConfig(target_modules=qv),
        "loha": peft.LoHaConfig(target_modules=qv),
        "lokr": peft.LoKrConfig(target_modules=qv),
        "oft": peft.OFTConfig(target_modules=qv),
        "boft": peft.BOFTConfig(target_modules=qv),
        "vera": peft.VeraConfig(target_modules=qv),  # r=256, one shared A and B (frozen, not counted)
        # CorDA (ipm) has LoRA's shapes: count without running its calibration
        "corda_lora": peft.LoraConfig(r=32, target_modules=qv),
        "corda_dora": peft.LoraConfig(r=32, target_modules=qv, use_dora=True),
        # EVA (rho=1) has LoRA's shapes: count without running its calibration
        "eva_dora": peft.LoraConfig(r=32, target_modules=qv, use_dora=True),
        # OLoRA and PiSSA inits keep LoRA's shapes: count without the QR / SVD
        "olora": peft.LoraConfig(r=32, target_modules=qv),
        "rslora": peft.LoraConfig(r=32, target_modules=qv, use_rslora=True),
        "pissa_dora": peft.LoraConfig(r=32, target_modules=qv, use_dora=True),
    }


def peft_count(name: str, layers: int) -> int:
    """PEFT's trainable count for `name` on the same shape (vocab 64: counts do not depend on it)."""
    import peft

    model = peft.get_peft_model(qwen3_06b(layers, vocab=64), peft_configs()[name])
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def qwen3_06b(layers: int, vocab: int = 151_936) -> torch.nn.Module:
    """Qwen3-0.6B-shaped decoder stack with random weights (seed 0), fp32, eval mode."""
    from transformers import Qwen3Config, Qwen3Model

    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return Qwen3Model(cfg).eval()


def calibration_batches(n: int = 4, seq: int = 512, vocab: int = 151_936) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(0, vocab, (1, seq), generator=g),
            "attention_mask": torch.ones(1, seq, dtype=torch.long),
        }
        for _ in range(n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="*", help="spec names (default: every shipped spec)")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--peft", action="store_true", help="add PEFT's count where PEFT has the method")
    args = ap.parse_args()
    names = args.specs or ll.shipped_names()
    t0 = time.perf_counter()
    model = qwen3_06b(args.layers)
    print(f"Qwen3-0.6B shape, {args.layers} layers, random weights: built in {time.perf_counter() - t0:.1f} s")
    data = calibration_batches()
    head = f"{'spec':18} {'r':>4} {'targets':>7} {'trainable':>11} {'upstream':>11} {'attach s':>9}"
    print(head + (f" {'PEFT':>11}" if args.peft else ""))
    for name in names:
        spec = load_spec(shipped_specs_dir() / f"{name}.yaml")
        over = {"r": 256 if spec.core in SPECTRAL else 32} if spec.hyper("r") and name not in OWN_DEFAULTS else {}
        cfg = ll.from_spec(name, **over)
        gen = cfg.variant()
        t0 = time.perf_counter()
        ll.attach(model, cfg, calibration_data=data if gen.CALIBRATION != "none" else None, progress=False)
        dt = time.perf_counter() - t0
        count = sum(p.numel() for p in ll.trainable_parameters(model))
        n_targets = len(ll.state(model).targets)
        ll.detach(model)
        want = UPSTREAM.get(name)
        want_here = want * args.layers // 28 if want else None
        mark = "" if want_here is None else (" ok" if count == want_here else " DIFFERS")
        theirs = ""
        if args.peft:
            p = peft_count(name, args.layers) if name in peft_configs() else None
            theirs = f" {(f'{p:,}' if p is not None else '-'):>11}" + ("" if p in (None, count) else " PEFT DIFFERS")
        print(
            f"{name:18} {over.get('r', '-'):>4} {n_targets:>7} {count:>11,} "
            f"{(f'{want_here:,}' if want_here else '-'):>11} {dt:>9.1f}{mark}{theirs}"
        )


if __name__ == "__main__":
    main()
