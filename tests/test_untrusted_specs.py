"""Spec text from untrusted hands (a checkpoint's embedded spec, a downloaded .yaml) cannot put
code into a generated module, and the files the compiler writes are never partial, never
written through a symlink, and never imported by name.

Every string field of specs/schema.json is tried with every payload: each is refused with a
one-line SpecError, or the module differs from the unmodified one only inside string constants
and comments, and importing it makes exactly the calls importing the unmodified one makes.
"""

from __future__ import annotations

import ast
import collections
import copy
import io
import json
import os
import sys
import threading
import tokenize
from pathlib import Path

import pytest
import yaml

import lora_lite as ll
from lora_lite import registry
from lora_lite.codegen import SpecError, generate, render
from lora_lite.codegen.atomic import write_atomic
from lora_lite.codegen.safety import UnsafeText, doc_text, literal, verify
from lora_lite.codegen.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "specs" / "schema.json").read_text())
BASE_NAME = "antipasto_arrow"  # has most optional fields: notes, reference_impl, select, arxiv, docs
# Shipped specs that hold the fields BASE lacks (math, modifiers, a scale rule, frozen tensors),
# tried in this order for a path BASE does not have.
OTHER_BASES = ("dora", "rslora", "lora_fa")
BASES = {n: yaml.safe_load((ROOT / "specs" / f"{n}.yaml").read_text()) for n in (BASE_NAME, *OTHER_BASES)}
BASE = BASES[BASE_NAME]
PAYLOADS = {
    "single quote": "'",
    "double quote": '"',
    "CR": "\r",
    "LF": "\n",
    "NEL U+0085": "\x85",
    "LS U+2028": "\u2028",
    "PS U+2029": "\u2029",
    "NUL": "\x00",
    "triple quotes": '"""',
    "hash": "#",
    "backslashes": "\\N{x}\\",
    "jinja expression": "{{ x }}",
    "jinja statement": "{% x %}",
    "code after a quote": '"); import os; os.system("x"); ("',
    "lone surrogate": "\ud800",
}


def _resolve(node: dict) -> dict:
    while "$ref" in node:
        node = SCHEMA["$defs"][node["$ref"].split("/")[-1]]
    return node


def string_fields(node: dict = SCHEMA, path: tuple = ()) -> list[tuple]:
    """Every place the schema lets a string in: "*" is an array item, "{}" a mapping's values
    (the first entry), "<key>" a mapping's keys."""
    node = _resolve(node)
    out = []
    types = node.get("type", [])
    if "string" in (types if isinstance(types, list) else [types]) or any(
        isinstance(e, str) for e in node.get("enum", [])
    ):
        out.append(path)
    for k, sub in node.get("properties", {}).items():
        out += string_fields(sub, path + (k,))
    if isinstance(node.get("additionalProperties"), dict):
        out += string_fields(node["additionalProperties"], path + ("{}",))
    if "propertyNames" in node:
        out.append(path + ("<key>",))
    if "items" in node:
        out += string_fields(node["items"], path + ("*",))
    return out


def _has(node, path: tuple) -> bool:
    for step in path:
        if step in ("*", "{}", "<key>"):
            if not node or not isinstance(node, (list, dict)):
                return False
            node = node[-1] if step == "*" else node[next(iter(node))]
            if step == "<key>":
                return True
        elif not isinstance(node, dict) or step not in node:
            return False
        else:
            node = node[step]
    return True


def base_for(path: tuple) -> str:
    """The first of BASE_NAME, OTHER_BASES whose data has a string (or mapping) at `path`."""
    return next(n for n, data in BASES.items() if _has(data, path))


def with_payload(path: tuple, payload: str) -> dict:
    """base_for(path)'s data with `payload` appended to the string at `path` (a new key for "<key>")."""
    data = copy.deepcopy(BASES[base_for(path)])
    parent, last = None, data
    for step in path:
        parent = last
        if step == "*":
            step = -1  # the last item (the last reference has every key)
        elif step == "{}":
            step = next(iter(last))
        elif step == "<key>":
            first = next(iter(last))
            last[first + payload] = copy.deepcopy(last[first])
            return data
        key, last = step, last[step]
    assert isinstance(last, (str, int)), path
    parent[key] = str(last) + payload
    return data


def _dump(data: dict) -> str:
    """YAML text for `data`; non-ASCII characters written as escapes (\\N, \\L, \\ud800), so YAML
    reads back exactly these characters (a raw U+0085 would be read as a line break)."""
    try:  # libyaml's emitter is ~10x faster, but cannot encode a lone surrogate
        return yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False, width=10_000)
    except UnicodeEncodeError:
        return yaml.safe_dump(data, sort_keys=False, width=10_000)


def _skeleton(src: str) -> str:
    """The module's AST with every string constant blanked: equal skeletons = equal code."""
    tree = ast.parse(src)
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            n.value = ""
    return ast.dump(tree)


def _carried(payload: str, src: str) -> bool:
    """The payload is in one of the module's string constants or comments (whitespace squashed:
    references are re-wrapped at 96 columns)."""
    squash = " ".join(payload.split())
    tree = ast.parse(src)
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    if any(squash in " ".join(s.split()) for s in strings):
        return True
    tokens = tokenize.generate_tokens(io.StringIO(src).readline)
    return any(squash in t.string for t in tokens if t.type == tokenize.COMMENT)


_AUDIT: list[str] = []
_RECORDING = [False]


def _audit(event: str, args) -> None:
    if _RECORDING[0]:
        _AUDIT.append(event)


sys.addaudithook(_audit)  # cannot be removed; records only while _RECORDING[0]


def import_trace(src: str) -> collections.Counter:
    """Execute module text as an import does; every Python and C call and audit event it makes."""
    code = compile(src, "<generated module>", "exec")
    calls: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event == "call":
            calls[(Path(frame.f_code.co_filename).name, frame.f_code.co_name)] += 1
        elif event == "c_call":
            calls[("builtin", getattr(arg, "__qualname__", repr(arg)))] += 1

    module = type(sys)("lora_lite_payload_probe")
    sys.modules[module.__name__] = module  # the dataclass decorator looks its module up
    _AUDIT.clear()
    _RECORDING[0] = True
    sys.setprofile(profile)
    try:
        exec(code, module.__dict__)
    finally:
        sys.setprofile(None)
        _RECORDING[0] = False
        del sys.modules[module.__name__]
    calls.update(("audit", e) for e in _AUDIT)
    return calls


BASE_SRC = render(parse_spec(_dump(BASE), "<payload>", stem=BASE_NAME))
SRCS = {n: render(parse_spec(_dump(d), "<payload>", stem=n)) for n, d in BASES.items()}
SKELETONS = {n: _skeleton(src) for n, src in SRCS.items()}
TRACES = {n: import_trace(src) for n, src in SRCS.items()}
FIELDS = string_fields()


def test_schema_walk_finds_every_string_field():
    names = {".".join(p) for p in FIELDS}
    for expected in ["title", "summary", "math", "notes", "references.*.authors", "hyperparameters.<key>"]:
        assert expected in names
    assert {"hyperparameters.{}.doc", "params.{}.doc", "params.{}.shape.*", "target.names.*", "params.<key>"} <= names
    assert {"modifiers.*.kind", "modifiers.*.rule", "modifiers.*.tensors.*"} <= names
    assert all(_has(BASES[base_for(p)], p) for p in FIELDS)  # every field is tried on some shipped spec
    assert len(FIELDS) >= 23  # 23 in this schema; more appear here as the schema grows


@pytest.mark.parametrize("path", FIELDS, ids=lambda p: ".".join(p))
def test_payload_in_any_string_field_is_refused_or_stays_a_string(path):
    outcomes, name = {}, base_for(path)
    for label, payload in PAYLOADS.items():
        text = _dump(with_payload(path, payload))
        try:
            spec = parse_spec(text, "<payload>", stem=name)
            src = render(spec)
        except SpecError as e:
            assert e.problems and all("\n" not in p and "\r" not in p for p in e.problems), e.problems
            assert str(e).count("\n") == len(e.problems) - 1
            assert all(p.startswith("<payload>") for p in e.problems)
            outcomes[label] = "refused"
            continue
        assert _skeleton(src) == SKELETONS[name], f"{label}: the code changed, not only strings"
        assert _carried(payload, src), label
        assert import_trace(src) == TRACES[name], f"{label}: importing ran something else"
        outcomes[label] = "kept as text"
    # every line-breaking or control character is refused wherever it is put
    for label in ("CR", "NEL U+0085", "LS U+2028", "PS U+2029", "NUL", "lone surrogate"):
        assert outcomes[label] == "refused", (label, outcomes)


def test_import_trace_sees_a_module_level_call():
    assert import_trace(BASE_SRC) != import_trace(BASE_SRC + "\nprint('x')\n")


# ---- the allow-list: modules the templates can never produce are refused ------------------

HOSTILE = {
    "import os": "import os\n",
    "from os import system": "from os import system\n",
    "import aliased": "import torch as os\n",
    "relative import": "from . import lora\n",
    "module-level call": "print('x')\n",
    "call in a constant": "NAME = print('x')\n",
    "lower-case assignment": "name = 1\n",
    "two targets": "A = B = 1\n",
    "if at top level": "if True:\n    X = 1\n",
    "decorated function": "@print\ndef f():\n    pass\n",
    "default argument call": "def f(x=print('x')):\n    pass\n",
    "dunder function": "def __getattr__(name):\n    return 1\n",
    "eval in a body": "def f():\n    return eval('1')\n",
    "open in a body": "def f():\n    return open('x')\n",
    "dunder attribute": "def f(x):\n    return x.__class__\n",
    "getattr with a name": "def f(x, n):\n    return getattr(x, n)\n",
    "torch.load": "def f():\n    return torch.load('x')\n",
    "torch.hub": "def f():\n    return torch.hub\n",
    "import in a body": "def f():\n    import os\n",
    "lambda": "def f():\n    return lambda: 1\n",
    "second Config": "class Other(AdapterConfig):\n    pass\n",
    "global": "def f():\n    global X\n",
    "module alias": "def f():\n    t = torch\n    return t.load('x')\n",
    "getattr on a module": "def f():\n    return getattr(torch, 'load')('x')\n",
    "call in an annotation": "def f(x: torch.zeros(1)):\n    pass\n",
}


@pytest.mark.parametrize("label", sorted(HOSTILE))
def test_verify_refuses_what_generated_code_may_not_hold(label):
    assert verify(BASE_SRC) is None
    with pytest.raises(UnsafeText) as e:
        verify(BASE_SRC + "\n\n" + HOSTILE[label])
    assert "\n" not in str(e.value)


def test_verify_requires_annotations_to_stay_unevaluated():
    with pytest.raises(UnsafeText, match="from __future__ import annotations"):
        verify(BASE_SRC.replace("from __future__ import annotations\n", ""))


@pytest.mark.parametrize(
    "value", ["plain", "it's", 'say "hi"', "both ' and \"", "back\\slash", "\x00\r\n\x85\u2028\ud800", "é", 0, -3]
)
def test_literal_reads_back_exactly(value):
    assert ast.literal_eval(literal(value)) == value
    assert type(ast.literal_eval(literal((value, 1.5, True, None)))[0]) is type(value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), b"x", {1: 2}, [1], object()])
def test_literal_refuses_what_is_not_a_finite_plain_value(value):
    with pytest.raises(UnsafeText):
        literal(value)


def test_literal_quotes_strings_as_ruff_does():
    assert literal("a") == '"a"' and literal('say "hi"') == "'say \"hi\"'" and literal("it's") == '"it\'s"'
    assert literal(1e-06) == "1e-06" and literal(True) == "True"  # json.dumps: true, NaN, null


@pytest.mark.parametrize("text", ['"', '"""', 'a"""b', '""""', "x\\", '\\"', 'end"'])
def test_doc_text_cannot_close_a_docstring(text):
    src = f'"""{doc_text(text)}"""\n'
    tree = ast.parse(src)
    assert len(tree.body) == 1 and ast.get_docstring(tree, clean=False) == text


# ---- writes: atomic, never through a symlink, never imported from the cache ---------------


def test_gen_replaces_a_symlinked_destination_without_touching_its_target(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.py"
    victim.write_text("# Code generated from x by lora_lite.codegen. DO NOT EDIT.\nkeep = 1\n")
    (out / "lora.py").symlink_to(victim)
    generate(ROOT / "specs", out)
    assert not (out / "lora.py").is_symlink()
    assert (out / "lora.py").read_text() == (ROOT / "generated" / "lora.py").read_text()
    assert victim.read_text().endswith("keep = 1\n")
    assert not list(out.glob(".*.tmp"))


def test_write_atomic_keeps_mode_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "f.py"
    path.write_text("old")
    path.chmod(0o640)
    write_atomic(path, "new")
    assert path.read_text() == "new" and (path.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.py"]


def test_concurrent_gen_and_readers_never_see_a_partial_file(tmp_path):
    # two gen runs write different versions of lora.py into one folder while a reader reads it
    texts = {}
    for version in ("a", "b"):
        specs = tmp_path / version
        specs.mkdir()
        title = "LoRA" if version == "a" else "LoRA, version b"
        (specs / "lora.yaml").write_text(
            (ROOT / "specs" / "lora.yaml").read_text().replace("title: LoRA", f"title: {title}")
        )
        texts[version] = render(load_spec(specs / "lora.yaml", display="specs/lora.yaml"))
    assert texts["a"] != texts["b"]
    out = tmp_path / "out"
    generate(tmp_path / "a", out)
    seen, errors, done = [], [], threading.Event()

    def gen(version):
        try:
            for _ in range(15):
                generate(tmp_path / version, out)
        except Exception as e:  # surfaced below
            errors.append(e)

    def read():
        while not done.is_set():
            seen.append((out / "lora.py").read_text())

    writers = [threading.Thread(target=gen, args=(v,)) for v in ("a", "b")]
    reader = threading.Thread(target=read)
    reader.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    done.set()
    reader.join()
    assert not errors, errors
    assert len(seen) > 10 and set(seen) <= set(texts.values()), "a reader saw an empty or partial file"
    assert sorted(p.name for p in out.iterdir()) == ["__init__.py", "lora.py"]  # no temporary file left


def _user_spec(tmp_path: Path, title: str = "My LoRA") -> Path:
    path = tmp_path / "my_lora.yaml"
    text = (ROOT / "specs" / "lora.yaml").read_text().replace("name: lora", "name: my_lora")
    path.write_text(text.replace("title: LoRA", f"title: {title}"))
    return path


def test_user_spec_is_imported_from_verified_text_not_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_LITE_CACHE", str(tmp_path / "cache"))
    spec = _user_spec(tmp_path)
    cfg = ll.from_spec(spec, r=4)
    module = type(cfg).variant()
    copy_path = Path(module.__file__)
    assert copy_path.parent == registry.cache_dir() and copy_path.read_text() == registry.user_render(
        load_spec(spec, display=str(spec)), spec
    )
    # a planted file under the cache name is overwritten, not imported
    copy_path.write_text("raise SystemExit('planted')\n")
    for mod in [m for m in sys.modules if m.startswith("lora_lite_user_my_lora")]:
        del sys.modules[mod]
    registry._USER_MODULES.clear()
    assert type(ll.from_spec(spec)).variant().TITLE == "My LoRA"
    assert copy_path.read_text().startswith("# Code generated")


def test_symlinked_cache_destination_is_replaced_not_followed(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_LITE_CACHE", str(tmp_path / "cache"))
    spec = _user_spec(tmp_path, title="Linked LoRA")
    text = registry.user_render(load_spec(spec, display=str(spec)), spec)
    name = f"lora_lite_user_my_lora_{__import__('hashlib').sha256(text.encode()).hexdigest()[:32]}.py"
    registry.cache_dir().mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (registry.cache_dir() / name).symlink_to(victim)
    module = type(ll.from_spec(spec)).variant()
    assert module.TITLE == "Linked LoRA"
    assert victim.read_text() == "precious"
    assert not (registry.cache_dir() / name).is_symlink()


def test_shipped_rendering_imports_the_shipped_module():
    text = (ROOT / "specs" / "lora.yaml").read_text()
    assert registry.variant_from_text(text, "lora") is sys.modules["lora_lite.generated.lora"]


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        ({"rank": 4}, "unknown override 'rank'"),
        ({"r": "8"}, "expected int"),
        ({"r": True}, "expected int"),
        ({"r": 0}, "below its minimum 1"),
        ({"r": 10**6}, "above its maximum 65536"),
        ({"alpha": float("nan")}, "expected finite float"),
        ({"alpha": float("inf")}, "expected finite float"),
        ({"alpha": True}, "expected float, got True"),
        ({"alpha": 10**400}, "overflows a float"),
        ({"dtype": "bf17"}, "unknown dtype"),
    ],
)
def test_from_spec_bad_override_is_a_one_line_spec_error(overrides, fragment):
    with pytest.raises(SpecError) as e:
        ll.from_spec("lora", **overrides)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value) and fragment in str(e.value)


def test_a_spec_path_that_is_not_a_regular_file_is_refused_without_reading(tmp_path):
    os.mkfifo(tmp_path / "fifo.yaml")  # open() would block until a writer came
    for path in (tmp_path / "fifo.yaml", tmp_path, Path("/dev/zero")):
        with pytest.raises(SpecError, match="not a regular file"):
            load_spec(path)
