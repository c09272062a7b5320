"""Find the generated module for a spec name or a YAML path, compiling on the fly if needed.

from_spec("lora")                 shipped spec -> lora_lite.generated.lora.Config()
from_spec("specs/lora.yaml")      a YAML path; uses the shipped module when the rendering
                                  is identical, else compiles into a cache folder
from_spec("my_variant.yaml")      a user's spec: compiled into the cache and imported
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from lora_lite.codegen import load_spec, render
from lora_lite.codegen.spec import Spec, parse_spec, shipped_specs_dir


def cache_dir() -> Path:
    """Where specs without a shipped module are compiled: $LORA_LITE_CACHE or ~/.cache/lora_lite."""
    root = os.environ.get("LORA_LITE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lora_lite"
    )
    return Path(root) / "generated"


def shipped_names() -> list[str]:
    """Names of the specs that ship with the package (those present in this install)."""
    return sorted(p.stem for p in shipped_specs_dir().glob("*.yaml"))


def _is_path(name_or_path: str | os.PathLike) -> bool:
    s = str(name_or_path)
    return isinstance(name_or_path, os.PathLike) or s.endswith((".yaml", ".yml")) or os.sep in s or "/" in s


def _import_text(spec: Spec, text: str) -> ModuleType:
    """Import rendered module text: the shipped module when identical, else a cached copy."""
    shipped = Path(importlib.import_module("lora_lite.generated").__file__).parent / f"{spec.name}.py"
    if shipped.is_file() and shipped.read_text(encoding="utf-8") == text:
        return importlib.import_module(f"lora_lite.generated.{spec.name}")
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    modname = f"lora_lite_user_{spec.name}_{digest}"
    if modname in sys.modules:
        return sys.modules[modname]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{modname}.py"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    mspec = importlib.util.spec_from_file_location(modname, path)
    module = importlib.util.module_from_spec(mspec)
    sys.modules[modname] = module
    mspec.loader.exec_module(module)
    module.SPEC_TEXT = spec.text
    return module


def variant_module(name_or_path: str | os.PathLike) -> ModuleType:
    """The generated module for a shipped spec name or a spec file path.

    Raises ValueError for an unknown name (listing the shipped ones) and SpecError for a bad file.
    """
    if _is_path(name_or_path):
        path = Path(name_or_path)
        spec = load_spec(path, display=str(name_or_path))
        return _import_text(spec, render(spec, display=_display(path)))
    name = str(name_or_path)
    if name not in shipped_names():
        raise ValueError(
            f"unknown spec {name!r}; shipped specs: {', '.join(shipped_names())} (or pass a path to a .yaml spec)"
        )
    return importlib.import_module(f"lora_lite.generated.{name}")


def variant_from_text(text: str, name: str) -> ModuleType:
    """The module for spec text carried in a checkpoint (validated like a file)."""
    spec = parse_spec(text, where=f"<checkpoint spec {name}>", stem=name)
    return _import_text(spec, render(spec, display=f"specs/{spec.name}.yaml"))


def _display(path: Path) -> str:
    """Header name for a spec file: `specs/<file>` inside a specs folder, else the path as given."""
    return f"specs/{path.name}" if path.parent.name == "specs" else str(path)


def spec_text(module: ModuleType) -> str:
    """YAML text of the spec a generated module came from (saved in checkpoints)."""
    if getattr(module, "SPEC_TEXT", None):
        return module.SPEC_TEXT
    return (shipped_specs_dir() / f"{module.NAME}.yaml").read_text(encoding="utf-8")


def from_spec(name_or_path: str | os.PathLike, **overrides):
    """Config for a spec: `from_spec("lora", r=16)`, `from_spec("specs/pissa.yaml")`.

    Overrides: any hyperparameter the spec declares, plus dtype, target_names, layers and
    residual (`from_spec("antipasto", residual="subtract")`: W untouched, for 4/8-bit bases).
    Raises ValueError naming an unknown override and listing the allowed ones.
    """
    module = variant_module(name_or_path)
    allowed = list(module.BOUNDS) + ["dtype", "target_names", "layers", "residual"]
    for key in overrides:
        if key not in allowed:
            raise ValueError(f"{module.NAME}: unknown override {key!r}; allowed: {', '.join(allowed)}")
    return module.Config(**overrides)
