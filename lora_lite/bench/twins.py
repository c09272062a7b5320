"""PEFT's version of each variant that PEFT also has: the pairing table of `lora-lite bench --peft`
(and of benchmarks/speed.py).

A twin is built from the lora-lite config of the same spec (same r, alpha, lambda, block and
group sizes, Cayley-Neumann setting, targets), so the two differ only in the library. A new spec
joins by adding one entry to TWINS. Nothing here imports peft until a twin is built.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Twin:
    """make(cfg, targets) -> a PEFT config; init: the data-driven step PEFT runs around
    get_peft_model ("none", "eva": initialize_lora_eva_weights after it, "corda":
    preprocess_corda before it)."""

    make: Callable
    init: str = "none"

    def attach(self, model, cfg, targets: list[str], calib: list[dict] | None, progress: bool = True):
        """get_peft_model with this twin's config (plus its data-driven init on `calib`, batches
        of input_ids (B, T) and attention_mask (B, T)); returns (peft model, seconds of the
        data-driven init). Adapter tensors stay in cfg.dtype (PEFT's autocast to fp32 only
        when that is fp32). PEFT raises for calibration it cannot use (None for EVA or CorDA)."""
        import peft

        pcfg, calibration_s, t0 = self.make(cfg, targets), 0.0, time.perf_counter()
        if self.init == "corda":
            from peft.tuners.lora.corda import preprocess_corda

            preprocess_corda(model, pcfg, run_model=lambda: [model(**b) for b in one_sequence_each(calib)])
            calibration_s = time.perf_counter() - t0
        pm = peft.get_peft_model(model, pcfg, autocast_adapter_dtype=cfg.dtype == torch.float32)
        if self.init == "eva":
            from peft.tuners.lora.eva import initialize_lora_eva_weights

            t0 = time.perf_counter()
            initialize_lora_eva_weights(pm, dataloader=calib, show_progress_bar=progress)
            calibration_s = time.perf_counter() - t0
        return pm, calibration_s


def one_sequence_each(batches: list[dict]) -> Iterator[dict]:
    """Each row of each batch alone, without its padding: {"input_ids": (1, T_row)}. PEFT's CorDA
    statistic takes one sequence per forward (its hook squeezes the batch dimension) and has no
    padding mask."""
    for b in batches:
        ids = b["input_ids"]  # (B, T)
        mask = b.get("attention_mask", torch.ones_like(ids)).bool()  # (B, T)
        for row, keep in zip(ids, mask):
            yield {"input_ids": row[keep][None]}  # (1, T_row)


def lora(cfg, targets: list[str], **kw):
    """PEFT LoraConfig at the spec's r and alpha on `targets` (module names)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=targets, lora_dropout=0.0, **kw)


def pissa(cfg, targets: list[str], **kw):
    """PEFT LoRA with PiSSA's init (arXiv:2404.02948): the exact SVD, or PEFT's randomized
    "pissa_niter_[k]" when the spec's svd_niter is k > 0."""
    niter = getattr(cfg, "svd_niter", 0)
    return lora(cfg, targets, init_lora_weights=f"pissa_niter_{niter}" if niter else "pissa", **kw)


def eva(cfg, targets: list[str], **kw):
    """PEFT LoRA with EVA init (arXiv:2410.07170), uniform rank."""
    from peft import EvaConfig

    return lora(cfg, targets, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0), **kw)  # uniform rank, as ours


def corda(cfg, targets: list[str], **kw):
    """PEFT LoRA with CorDA's context-oriented init, ipm (arXiv:2406.05223). PEFT's damping
    starts at 0.01 of the mean of diag(C); raises ValueError for another cov_eps."""
    from peft.tuners.lora.config import CordaConfig

    if cfg.cov_eps != 0.01:
        raise ValueError(f"PEFT's CorDA damping starts at 0.01; {type(cfg).__name__}.cov_eps={cfg.cov_eps} has no twin")
    return lora(cfg, targets, init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"), **kw)


def delora(cfg, targets: list[str]):
    """PEFT DeloraConfig at the spec's r and lambda0 (arXiv:2503.18225)."""
    from peft import DeloraConfig

    return DeloraConfig(r=cfg.r, delora_lambda=cfg.lambda0, target_modules=targets)


def ia3(cfg, targets: list[str], feedforward: bool):
    """PEFT IA3Config (arXiv:2205.05638): output gains, or input gains on feed-forward targets."""
    from peft import IA3Config

    return IA3Config(target_modules=targets, feedforward_modules=targets if feedforward else [])


def hra(cfg, targets: list[str]):
    """PEFT HRAConfig at the spec's r (arXiv:2405.17484)."""
    from peft import HRAConfig

    return HRAConfig(r=cfg.r, target_modules=targets)


def road(cfg, targets: list[str]):
    """PEFT RoadConfig (arXiv:2409.00119): road_variant 1, 2, 4 -> variant "road_1", "road_2", "road_4"."""
    from peft import RoadConfig

    return RoadConfig(variant=f"road_{cfg.road_variant}", group_size=cfg.group_size, target_modules=targets)


def loha(cfg, targets: list[str]):
    """PEFT LoHaConfig at the spec's r and alpha (arXiv:2108.06098), no dropouts."""
    from peft import LoHaConfig

    return LoHaConfig(r=cfg.r, alpha=cfg.alpha, rank_dropout=0.0, module_dropout=0.0, target_modules=targets)


def lokr(cfg, targets: list[str]):
    """PEFT LoKrConfig (arXiv:2309.14859) at the spec's r, alpha and decompose_factor, no dropouts.
    Where r >= max(k, n) / 2 PEFT holds a full w2 (README, known divergences): counts differ there."""
    from peft import LoKrConfig

    return LoKrConfig(
        r=cfg.r,
        alpha=cfg.alpha,
        decompose_factor=cfg.decompose_factor,
        rank_dropout=0.0,
        module_dropout=0.0,
        target_modules=targets,
    )


def vera(cfg, targets: list[str]):
    """PEFT VeraConfig (arXiv:2310.11454) at the spec's r, d_initial and projection_prng_key."""
    from peft import VeraConfig

    return VeraConfig(
        r=cfg.r,
        d_initial=cfg.d_initial,
        projection_prng_key=cfg.projection_prng_key,
        vera_dropout=0.0,
        target_modules=targets,
    )


def oft(cfg, targets: list[str]):
    """PEFT OFTConfig (arXiv:2306.07280) at the spec's block size and Cayley-Neumann setting."""
    from peft import OFTConfig

    return OFTConfig(
        oft_block_size=cfg.oft_block_size,
        use_cayley_neumann=cfg.use_cayley_neumann,
        num_cayley_neumann_terms=cfg.num_cayley_neumann_terms,
        module_dropout=0.0,
        target_modules=targets,
    )


def boft(cfg, targets: list[str]):
    """PEFT BOFTConfig (arXiv:2311.06243) at the spec's block size and butterfly factors (1)."""
    from peft import BOFTConfig

    return BOFTConfig(
        boft_block_size=cfg.boft_block_size,
        boft_n_butterfly_factor=cfg.boft_n_butterfly_factor,
        boft_dropout=0.0,
        target_modules=targets,
    )


TWINS: dict[str, Twin] = {
    "lora": Twin(lora),
    "pissa": Twin(pissa),
    "dora": Twin(lambda c, t: lora(c, t, use_dora=True)),
    "delora": Twin(delora),
    "ia3": Twin(lambda c, t: ia3(c, t, feedforward=False)),
    "ia3_ff": Twin(lambda c, t: ia3(c, t, feedforward=True)),
    "hra": Twin(hra),
    "eva": Twin(eva, init="eva"),
    "olora": Twin(lambda c, t: lora(c, t, init_lora_weights="olora")),
    "rslora": Twin(lambda c, t: lora(c, t, use_rslora=True)),
    "pissa_dora": Twin(lambda c, t: pissa(c, t, use_dora=True)),
    "eva_dora": Twin(lambda c, t: eva(c, t, use_dora=True), init="eva"),
    "corda_lora": Twin(corda, init="corda"),
    "corda_dora": Twin(lambda c, t: corda(c, t, use_dora=True), init="corda"),
    "road": Twin(road),
    "loha": Twin(loha),
    "lokr": Twin(lokr),
    "vera": Twin(vera),
    "oft": Twin(oft),
    "boft": Twin(boft),
    # a new spec with a PEFT equivalent joins here, one line each
}
