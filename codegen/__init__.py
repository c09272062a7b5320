"""The spec compiler: YAML spec -> one readable hook module per variant.

Map of the generator (read top to bottom):

    spec.py      load YAML (bounded: size, aliases, depth; line numbers, duplicate keys refused)
                 -> every string and number checked (control characters, finite numbers)
                 -> validate against specs/schema.json (jsonschema, draft 2020-12)
                 -> semantic checks (bounds, shape expressions, tensors the core needs)
                 -> a frozen `Spec` dataclass
    shapes.py    the safe shape-expression evaluator (names, ints, + - * //)
    safety.py    the only ways spec data enters code: literal(), doc_text(), comment_text();
                 verify(): compile the module and check it against the allow-list
    compiler.py  Spec -> template context (all branching happens here, in Python)
                 -> Jinja2 render (StrictUndefined) from fragments in templates/
                 -> safety.verify -> write only if changed (atomic.py), remove orphans
    templates/   module.py.j2 plus fragments: basis/<source>.j2, core/<kind>_*.j2

Installed as `lora_lite.codegen`; the CLI entry is `lora-lite gen`.
"""

from .compiler import check, generate, render
from .spec import Spec, SpecError, load_spec

__all__ = ["Spec", "SpecError", "load_spec", "render", "generate", "check"]
