"""The spec compiler: YAML spec -> one readable hook module per variant.

Map of the generator (read top to bottom):

    spec.py      load YAML (bounded: size, aliases, depth; line numbers, duplicate keys refused)
                 -> every string and number checked (control characters, finite numbers)
                 -> round-one spellings read as compositions (upgrade)
                 -> validate against specs/schema.json (jsonschema, draft 2020-12; enums from parts/)
                 -> the composition's rules, bounds, shape expressions, then params and
                    hyperparameters against what it reads
                 -> a frozen `Spec` dataclass
    algebra.py   part definitions (parts/<axis>/<name>.j2: metadata + code blocks), compose()
                 and its rules, the typed basis -> core hand-off, the matrix of cells
    shapes.py    the safe shape-expression evaluator (names, ints, + - * //)
    safety.py    the only ways spec data enters code: literal(), doc_text(), comment_text();
                 verify(): compile the module and check it against the allow-list
    compiler.py  Spec -> the composition's blocks in order -> templates/module.py.j2
                 -> safety.verify -> write only if changed (atomic.py), remove orphans

Installed as `lora_lite.codegen`; the CLI entry is `lora-lite gen`.
"""

from .compiler import check, generate, render
from .spec import Spec, SpecError, load_spec

__all__ = ["Spec", "SpecError", "load_spec", "render", "generate", "check"]
