"""The contract between the runtime and a generated module: everything the runtime reads.

Every module under generated/ (and every spec compiled on the fly) defines all of it;
`isinstance(module, Variant)` checks the names are there, tests/test_algebra.py checks their
types and that lora_lite reads no other module attribute.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class Variant(Protocol):
    NAME: str  # the spec's name
    TITLE: str
    HOOK: str  # "output": forward(m, x, y, cfg) -> new y; "input": forward(m, x, cfg) -> new x
    CAST_INPUT: bool  # the hook casts x to cfg.dtype (and an input hook's result back)
    RESIDUAL: str  # default of cfg.residual: "none", "crop" or "subtract"
    RESIDUALS: tuple  # the values cfg.residual may take
    CALIBRATION: str  # "none", "optional" or "required"
    STATISTICS: tuple  # the (i, i) statistics init() reads from stats (lora_lite.calibration.STATISTICS)
    TARGET_NAMES: tuple  # default targets, re.search on module names
    LR: float  # recommended AdamW learning rate
    QUANTIZED_BASE: bool  # bitsandbytes 4/8-bit targets allowed
    USES_BASE_WEIGHT: bool  # the math reads W: load refuses a base whose weights differ
    EMBEDDING: bool  # nn.Embedding targets work: init(..., embedding=True), forward reads token ids
    RUNTIME_KNOBS: tuple  # hyperparameters that may change after attach (set_coeff)
    RANKS: tuple  # hyperparameters clamped per target to min(d_in, d_out)
    PER_RANK: dict  # hyperparameter -> e: read over r ** e, so clamping r scales it by (r_c / r) ** e
    BOUNDS: dict  # hyperparameter -> (min, max); its keys are the hyperparameters
    PARAMS: dict  # tensor -> (shape expressions, init, trainable)
    SHARED: tuple  # tensors of PARAMS kept once per adapter, shared by every target (frozen)
    Config: type  # the AdapterConfig subclass with the spec's hyperparameters

    def shapes(self, cfg, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]: ...

    def check(self, cfg, d_in: int, d_out: int) -> None: ...  # ValueError: the layer cannot take cfg

    def init(self, W: Tensor, cfg, stats: dict | None = None) -> dict[str, Tensor]: ...

    def forward(self, m: nn.Module, x: Tensor, *rest) -> Tensor: ...

    def frozen_weight(self, m: nn.Module, cfg) -> Tensor: ...

    def shared(self, cfg, d_in: int, d_out: int) -> dict[str, Tensor]: ...


MEMBERS = tuple(n for n in (*Variant.__annotations__, "shapes", "check", "init", "forward", "frozen_weight", "shared"))
