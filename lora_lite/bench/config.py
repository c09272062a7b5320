"""BenchConfig: every setting of one `lora-lite bench` run, typed, with the two presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass

SMOLLM2 = "smollm2-135m"

# --quick: a CPU preset that runs three variants in a few minutes on 2 cores. The lr floor is a
# compromise for so few steps (measured: LoRA at its spec lr 1e-4 moves answer NLL by < 0.01 in
# 20 steps); explicit flags override every entry.
QUICK = dict(
    variants="lora,ia3,antipasto_corda",
    steps=20,
    batch_size=4,
    seq_len=96,
    eval_samples=16,
    gen_samples=4,
    max_new_tokens=24,
    lr_floor=1e-3,
)
# The GPU defaults (one pass over the 2,400 packaged training questions at batch 8).
DEFAULTS = dict(
    variants="all",
    steps=300,
    batch_size=8,
    seq_len=384,
    eval_samples=200,
    gen_samples=50,
    max_new_tokens=256,
    lr_floor=0.0,
)


@dataclass(frozen=True)
class BenchConfig:
    """One bench run. `variants` are spec names or paths; `lr` None means the spec's recommended
    lr, at least `lr_floor`; `data` is "gsm8k" (hub, else the packaged subset) or "builtin";
    `data_dir` (GSM8K-format train.jsonl/test.jsonl) replaces both; `peft` adds PEFT's version
    of every variant that has one."""

    variants: tuple[str, ...] = ("lora",)
    model: str = SMOLLM2
    data: str = "gsm8k"
    data_dir: str | None = None
    steps: int = DEFAULTS["steps"]
    batch_size: int = DEFAULTS["batch_size"]
    seq_len: int = DEFAULTS["seq_len"]
    lr: float | None = None
    lr_floor: float = 0.0
    eval_samples: int = DEFAULTS["eval_samples"]
    gen_samples: int = DEFAULTS["gen_samples"]
    max_new_tokens: int = DEFAULTS["max_new_tokens"]
    calib_batches: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    autocast: bool = False
    seed: int = 0
    out: str = "bench-out"
    peft: bool = False
    quick: bool = False
    verbose: bool = False

    def lr_for(self, spec_lr: float) -> float:
        """The learning rate a variant trains at (PEFT's twin uses the same one)."""
        return self.lr if self.lr is not None else max(spec_lr, self.lr_floor)

    def settings(self) -> dict:
        """What results.json records under "settings" (everything that changes the numbers)."""
        keep = ("steps", "batch_size", "seq_len", "eval_samples", "gen_samples", "max_new_tokens", "seed")
        s = {k: v for k, v in asdict(self).items() if k in keep}
        s.update(dtype=self.dtype, autocast=self.autocast, quick=self.quick, lr=self.lr, lr_floor=self.lr_floor)
        s.update(calib_batches=self.calib_batches, peft=self.peft)
        return s
