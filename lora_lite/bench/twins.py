"""PEFT's version of each variant that PEFT also has: the pairing table of `lora-lite bench --peft`.

A twin is built from the lora-lite config of the same spec (same r, alpha, lambda, targets), so
the two differ only in the library. A new spec joins by adding one entry to TWINS. Nothing here
imports peft until a twin is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Twin:
    """make(cfg, targets) -> a PEFT config; init: the data-driven step PEFT runs around
    get_peft_model ("none", "eva": initialize_lora_eva_weights after it, "corda":
    preprocess_corda before it)."""

    make: Callable
    init: str = "none"


def lora(cfg, targets: list[str], **kw):
    """PEFT LoraConfig at the spec's r and alpha on `targets` (full module names)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=targets, lora_dropout=0.0, **kw)


def eva(cfg, targets: list[str]):
    """PEFT LoRA with EVA init (arXiv:2410.07170), uniform rank."""
    from peft import EvaConfig

    return lora(cfg, targets, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))  # uniform rank, as ours


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


TWINS: dict[str, Twin] = {
    "lora": Twin(lora),
    "pissa": Twin(lambda c, t: lora(c, t, init_lora_weights="pissa")),
    "dora": Twin(lambda c, t: lora(c, t, use_dora=True)),
    "delora": Twin(delora),
    "ia3": Twin(lambda c, t: ia3(c, t, feedforward=False)),
    "ia3_ff": Twin(lambda c, t: ia3(c, t, feedforward=True)),
    "hra": Twin(hra),
    "eva": Twin(eva, init="eva"),
}


def attach_peft(twin: Twin, model, cfg, targets: list[str], calib: list[dict] | None):
    """get_peft_model with the twin's config (plus its data-driven init on `calib`); returns
    (peft model, seconds of the data-driven init). PEFT raises for calibration it cannot use."""
    import time

    import peft

    pcfg, calibration_s = twin.make(cfg, targets), 0.0
    if twin.init == "corda":
        from peft.tuners.lora.corda import preprocess_corda

        t0 = time.perf_counter()
        preprocess_corda(model, pcfg, run_model=lambda: [model(**b) for b in calib])
        calibration_s = time.perf_counter() - t0
    pm = peft.get_peft_model(model, pcfg)
    if twin.init == "eva":
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        t0 = time.perf_counter()
        initialize_lora_eva_weights(pm, dataloader=calib, show_progress_bar=True)
        calibration_s = time.perf_counter() - t0
    return pm, calibration_s
