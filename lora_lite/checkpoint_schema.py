"""JSON Schema of a checkpoint's lora_lite metadata (formats 1 and 2), and the size limits.

checkpoint.load validates the metadata against SCHEMA before using any of it; what the schema
cannot know (the spec's own hyperparameter names and bounds, tensor shapes, the model) is
checked after the spec is compiled. Non-finite numbers (JSON NaN/Infinity) are refused before
the schema runs, so "number" here always means a finite one.
"""

from __future__ import annotations

MAX_HEADER_BYTES = 8 << 20  # safetensors JSON header (tensor table + metadata); ~1 MB for a 70B model
MAX_TENSORS = 65536
MAX_TARGETS = 16384
MAX_SPEC_CHARS = 1 << 18  # shipped specs are ~2 KB
MAX_DIM = 2**31
FINGERPRINT_LEN = 9  # runtime.weight_fingerprint: ||W||_F and k = 8 projections

_dim = {"type": "integer", "minimum": 1, "maximum": MAX_DIM}
_label = {"type": ["string", "null"], "pattern": "^[a-z0-9_]{1,32}$"}  # "nf4", "int8", a dtype name

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "lora-lite checkpoint metadata",
    "type": "object",
    "additionalProperties": False,
    "required": ["format_version", "lora_lite_version", "spec_name", "spec", "config", "targets"],
    "properties": {
        "format_version": {"enum": [1, 2]},
        "sha256": {
            "description": "format 2: sha256 of the metadata without this key and of every tensor (checkpoint.digest)",
            "type": "string",
            "pattern": "^[0-9a-f]{64}$",
        },
        "lora_lite_version": {"type": "string", "pattern": "^[0-9A-Za-z.+_-]{1,64}$"},
        "spec_name": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,39}$"},
        "spec": {"type": "string", "minLength": 1, "maxLength": MAX_SPEC_CHARS},
        "config": {
            "type": "object",
            "required": ["target_names", "layers", "dtype", "residual"],
            "properties": {
                "target_names": {
                    "type": ["array", "null"],
                    "minItems": 1,
                    "maxItems": 1024,
                    "items": {"type": "string", "minLength": 1, "maxLength": 1024},
                },
                "layers": {
                    "type": ["array", "null"],
                    "maxItems": 1 << 16,
                    "items": {"type": "integer", "minimum": 0, "maximum": MAX_DIM},
                },
                "dtype": {"enum": ["float32", "bfloat16", "float16", "float64"]},
                "residual": {"enum": ["none", "crop", "subtract"]},
            },
            "additionalProperties": {"type": ["number", "boolean"]},  # the spec's hyperparameters
        },
        "targets": {
            "type": "object",
            "minProperties": 1,
            "maxProperties": MAX_TARGETS,
            "propertyNames": {"type": "string", "maxLength": 1024, "pattern": r"^[\w-]+(\.[\w-]+)*$"},
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": [
                    "hyperparameters",
                    "d_in",
                    "d_out",
                    "weight_shape",
                    "weight_dtype",
                    "quantization",
                    "fingerprint",
                ],
                "properties": {
                    "hyperparameters": {
                        "type": "object",
                        "maxProperties": 64,
                        "propertyNames": {"pattern": "^[a-z][a-z0-9_]{0,39}$"},
                        "additionalProperties": {"type": ["number", "boolean"]},
                    },
                    "d_in": _dim,
                    "d_out": _dim,
                    "weight_shape": {"type": "array", "minItems": 2, "maxItems": 2, "items": _dim},
                    "weight_dtype": {"type": "string", "pattern": "^[a-z0-9_]{1,32}$"},
                    "quantization": _label,
                    "fingerprint": {
                        "type": "array",
                        "minItems": FINGERPRINT_LEN,
                        "maxItems": FINGERPRINT_LEN,
                        "prefixItems": [{"type": "number", "minimum": 0}],  # ||W||_F
                        "items": {"type": "number"},
                    },
                    "loaded_from_quantization": _label,  # written by a save after a load
                    "loaded_fingerprint_distance": {"type": "number", "minimum": 0},
                    "scale": {"type": "number"},  # ll.scale of the target (finite: see above); 1.0 when absent
                },
            },
        },
    },
    "if": {"properties": {"format_version": {"const": 2}}},
    "then": {"required": ["sha256"]},
}
