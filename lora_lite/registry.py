"""Find the generated module for a spec name or a YAML path, compiling on the fly if needed.

from_spec("lora")                 shipped spec -> lora_lite.generated.lora.Config()
from_spec("specs/lora.yaml")      a YAML path; uses the shipped module when the rendering
                                  is identical, else compiles it (below)
from_spec("my_variant.yaml")      a user's spec: compiled from its verified text and imported

A spec that is not a shipped one (a user's file, the text a checkpoint carries) is rendered,
compiled and checked against the compiler's allow-list (codegen.safety.verify), then executed
from that verified text in memory into a fresh module object. A copy goes to cache_dir() for
people to read; it is never imported, and nothing is trusted by its name, mtime or bytecode.
"""

from __future__ import annotations

import hashlib
import importlib
import linecache
import os
import shlex
import sys
import threading
import types
import warnings
from pathlib import Path
from types import ModuleType

from lora_lite.codegen import load_spec, render
from lora_lite.codegen.atomic import write_atomic
from lora_lite.codegen.safety import regex_problem
from lora_lite.codegen.spec import Spec, SpecError, parse_spec, shipped_specs_dir
from lora_lite.config import allowed_keys, unknown_key


def cache_dir() -> Path:
    """Where readable copies of compiled user specs go: $LORA_LITE_CACHE or ~/.cache/lora_lite."""
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


# Modules compiled from spec text in this process: module name -> (verified text, module).
_USER_MODULES: dict[str, tuple[str, ModuleType]] = {}
_LOCK = threading.Lock()


def _readable_copy(modname: str, text: str) -> str | None:
    """Write `text` to cache_dir()/<modname>.py for people to read (atomic, never through a
    symlink); its path, or None with a warning when the folder is not writable."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / f"{modname}.py", text)
    except OSError as e:
        warnings.warn(f"lora_lite: no readable copy of {modname} in {folder}: {e.strerror or e}", stacklevel=3)
        return None
    return str(folder / f"{modname}.py")


def _import_text(spec: Spec, text: str, path: Path | None = None) -> ModuleType:
    """The module for rendered, verified text (render() compiled it and checked the allow-list).

    Byte-identical to a shipped module: that module. Otherwise the text is compiled and executed
    into a fresh module registered as lora_lite_user_<name>_<digest of the text>; the same text
    again in this process returns the same module. A spec read from `path` is rendered again
    with a header naming that file and the call that rebuilds it (user_render). Raises SpecError
    if executing it fails.
    """
    shipped = Path(importlib.import_module("lora_lite.generated").__file__).parent / f"{spec.name}.py"
    if shipped.is_file() and shipped.read_text(encoding="utf-8") == text:
        return importlib.import_module(f"lora_lite.generated.{spec.name}")
    if path is not None:
        text = user_render(spec, path)
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    modname = f"lora_lite_user_{spec.name}_{digest}"
    with _LOCK:  # two threads loading one spec get one module (one Config class)
        known = _USER_MODULES.get(modname)
        if known is not None and known[0] == text and sys.modules.get(modname) is known[1]:
            return known[1]
        module = _exec_text(spec, text, modname)
        _USER_MODULES[modname] = (text, module)
        return module


def _exec_text(spec: Spec, text: str, modname: str) -> ModuleType:
    """Compile `text` itself (the cache copy is never read) and run it in a fresh module object
    registered as `modname`; tracebacks and inspect.getsource read the text from linecache."""
    filename = _readable_copy(modname, text) or f"<lora_lite spec {spec.name}>"
    code = compile(text, filename, "exec", dont_inherit=True)  # from the verified text, never the file
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)  # tracebacks, getsource
    module = types.ModuleType(modname)
    module.__file__ = filename
    sys.modules[modname] = module  # before exec: the dataclass decorator looks its module up
    try:
        exec(code, module.__dict__)
    except Exception as e:
        del sys.modules[modname]
        raise SpecError([f"{spec.source}: $: generated module failed to load: {type(e).__name__}: {e}"]) from None
    module.SPEC_TEXT = spec.text
    return module


def variant_module(name_or_path: str | os.PathLike) -> ModuleType:
    """The generated module for a shipped spec name or a spec file path.

    Raises SpecError (a ValueError) for an unknown name (listing the shipped ones) or a bad file.
    """
    if _is_path(name_or_path):
        path = Path(name_or_path)
        spec = load_spec(path, display=str(name_or_path))
        return _import_text(spec, render(spec, display=_display(path)), path)
    name = str(name_or_path)
    if name not in shipped_names():
        raise SpecError(
            [f"unknown spec {name!r}; shipped specs: {', '.join(shipped_names())} (or pass a path to a .yaml spec)"]
        )
    return importlib.import_module(f"lora_lite.generated.{name}")


def variant_from_text(text: str, name: str) -> ModuleType:
    """The module for spec text carried in a checkpoint (validated like a file)."""
    spec = parse_spec(text, where=f"<checkpoint spec {name}>", stem=name)
    return _import_text(spec, render(spec, display=f"specs/{spec.name}.yaml"))


def _display(path: Path) -> str:
    """Header name for a spec file: `specs/<file>` inside a specs folder, else the path as given."""
    return f"specs/{path.name}" if path.parent.name == "specs" else str(path)


def user_render(spec: Spec, path: Path) -> str:
    """Module text of a user's spec file, its header naming the file as given and the commands
    that rebuild (ll.from_spec) and check (lora-lite validate) it."""
    return render(
        spec,
        display=str(path),
        regen=f"ll.from_spec({str(path)!r})",
        check_cmd=f"lora-lite validate {shlex.quote(str(path))}",
    )


def spec_text(module: ModuleType) -> str:
    """YAML text of the spec a generated module came from (saved in checkpoints)."""
    if getattr(module, "SPEC_TEXT", None):
        return module.SPEC_TEXT
    return (shipped_specs_dir() / f"{module.NAME}.yaml").read_text(encoding="utf-8")


def from_spec(name_or_path: str | os.PathLike, **overrides):
    """Config for a spec: `from_spec("lora", r=16)`, `from_spec("specs/pissa.yaml")`.

    Overrides: any hyperparameter the spec declares, plus dtype, target_names, layers and
    residual (`from_spec("antipasto", residual="subtract")`: W untouched, for 4/8-bit bases).
    Raises SpecError (a ValueError), one line, for a bad spec, an unknown override (listing the
    allowed ones) or a bad value: wrong type (a bool is not a number), NaN or infinite, or
    outside the spec's min/max. A typed config (ll.LoRAConfig(rr=3)) refuses an unknown keyword
    with the same message (AdapterConfig.__new__).
    """
    module = variant_module(name_or_path)
    allowed = allowed_keys(module)
    for key in overrides:
        if key not in allowed:
            raise unknown_key(module, key)
    names = overrides.get("target_names")
    for rx in (names,) if isinstance(names, str) else names if isinstance(names, (list, tuple)) else ():
        if isinstance(rx, str) and (problem := regex_problem(rx)):
            raise SpecError([f"{module.NAME}.target_names: regex {rx!r}: {problem}"])
    try:
        return module.Config(**overrides)
    except (TypeError, ValueError) as e:
        if isinstance(e, SpecError):
            raise
        raise SpecError([f"{module.NAME}: {e}"]) from None
