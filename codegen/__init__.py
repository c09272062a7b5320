"""The spec compiler: YAML spec -> one readable hook module per variant.

Map of the generator (read top to bottom):

    spec.py      load YAML (safe loader, line numbers, duplicate keys refused)
                 -> validate against specs/schema.json (jsonschema, draft 2020-12)
                 -> semantic checks (shape expressions, tensors the core needs)
                 -> a frozen `Spec` dataclass
    shapes.py    the safe shape-expression evaluator (names, ints, + - * //)
    compiler.py  Spec -> template context (all branching happens here, in Python)
                 -> Jinja2 render (StrictUndefined) from fragments in templates/
                 -> ast.parse check -> write only if changed, remove orphans
    templates/   module.py.j2 plus fragments: basis/<source>.j2, core/<kind>_*.j2

Installed as `lora_lite.codegen`; the CLI entry is `lora-lite gen`.
"""

from .compiler import check, generate, render
from .spec import Spec, SpecError, load_spec

__all__ = ["Spec", "SpecError", "load_spec", "render", "generate", "check"]
