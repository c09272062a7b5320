"""Hugging Face Trainer (and TRL's trainers, which subclass it) with a lora-lite adapter.

    model = AutoModelForCausalLM.from_pretrained(...)      # float, or 4-bit with BitsAndBytesConfig
    ll.attach(model, ll.from_spec("lora", r=8))
    trainer = ll.AdapterTrainer(model=model, args=TrainingArguments(...), train_dataset=...)
    trainer.train()                                         # or train(resume_from_checkpoint=True)

What it changes, using only Trainer's public methods:
- save_model (what every checkpoint-N and trainer.save_model() write): `model.safetensors` is
  an `ll.save` file, the adapter alone (trainable and frozen tensors, with its metadata), so
  `ll.load(base_model, "checkpoint-N/model.safetensors")` reads it. The optimizer, scheduler,
  RNG and trainer state files are Trainer's own. Its keys are the adapter tensors' names in
  the model's state_dict, so Trainer's resume (`train(resume_from_checkpoint=...)`) loads them
  into the attached adapter with `load_state_dict(strict=False)` and leaves the base weights
  alone.
- train(resume_from_checkpoint=...) first checks that the checkpoint holds the attached
  variant on the same targets (CheckpointError otherwise, before anything is loaded), and
  while Trainer resumes, drops its warning that lists every base weight as a "missing key"
  (they are missing on purpose; a logging filter on the `transformers.trainer` logger).
- Trainer refuses a model whose `is_quantized` is True unless it is a PEFT model ("cannot
  fine-tune purely quantized models"). AdapterTrainer requires an attached adapter (AttachError
  otherwise), which is what that check asks for, and clears the public `is_quantized` flag only
  while Trainer.__init__ runs, then sets it back.

transformers is imported when this module is (`ll.AdapterTrainer` imports it on first use).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import SAFE_WEIGHTS_NAME

from .checkpoint import SHARED_PREFIX, CheckpointError, read_metadata, save
from .runtime import AttachError, state
from .wrappers import is_sharded, unwrap

TRAINING_ARGS_NAME = "training_args.bin"  # what Trainer writes beside its weights


class AdapterTrainer(Trainer):
    """transformers.Trainer for a model carrying a lora-lite adapter; checkpoints hold only the adapter.

    Takes Trainer's arguments; `model` must have an adapter attached (ll.attach or ll.load),
    and may be a 4/8-bit bitsandbytes model. Raises AttachError when none is attached.
    See the module docstring for what differs from Trainer.
    """

    def __init__(self, model=None, *args, **kwargs):
        if model is None or state(model) is None:
            raise AttachError("AdapterTrainer: attach an adapter first (ll.attach(model, cfg) or ll.load(model, path))")
        inner = unwrap(model)
        quantized = getattr(inner, "is_quantized", False) is True
        if quantized:
            inner.is_quantized = False  # Trainer's check wants trainable adapters: ours are attached
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            if quantized:
                inner.is_quantized = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the adapter (ll.save) as `output_dir/model.safetensors`, plus the tokenizer or
        processor and the training arguments, from the main process (every process joins the
        gather of an FSDP2-sharded adapter)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        sharded = any(is_sharded(p) for p in unwrap(self.model).parameters())
        if self.args.should_save or sharded:
            save(self.model, Path(output_dir) / SAFE_WEIGHTS_NAME, name="default")
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """Trainer.train; a checkpoint to resume from must hold the attached variant and targets."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise CheckpointError(f"no checkpoint-N folder in {self.args.output_dir} to resume from")
        if not resume_from_checkpoint:
            return super().train(None, *args, **kwargs)
        check_resumable(self.model, Path(resume_from_checkpoint) / SAFE_WEIGHTS_NAME)
        log, quiet = logging.getLogger("transformers.trainer"), BaseWeightsNotMissing()
        log.addFilter(quiet)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            log.removeFilter(quiet)


class BaseWeightsNotMissing(logging.Filter):
    """Drops Trainer's "missing keys" warning on resume: an adapter checkpoint lacks the base
    weights by design (check_resumable has matched its variant and targets first); and its
    "unexpected keys" warning when those are only the shared tensors stored once
    (`shared.<name>`: VeRA's A and B, which the attached adapter already holds)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith("There were unexpected keys in the checkpoint model loaded"):
            keys = re.findall(r"'([^']*)'", msg)
            return not (keys and all(k.startswith(SHARED_PREFIX) for k in keys))
        return not msg.startswith("There were missing keys in the checkpoint model loaded")


def check_resumable(model, path: Path) -> None:
    """CheckpointError unless `path` is an ll.save file of the variant attached to `model`, with
    the same targets (a whole-model checkpoint or another adapter would load partly or not at all)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; AdapterTrainer checkpoints hold the adapter in this file")
    meta = read_metadata(path)
    st = state(model)
    if meta["spec_name"] != st.variant.NAME or set(meta["targets"]) != set(st.targets):
        raise CheckpointError(
            f"{path}: holds a {meta['spec_name']} adapter on {len(meta['targets'])} targets; the model has "
            f"{st.variant.NAME} on {len(st.targets)}: attach the same config before resuming"
        )
