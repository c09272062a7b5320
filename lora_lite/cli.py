"""Command line: `lora-lite gen`, `validate`, `example`, `matrix` and `bench`.

lora-lite gen [--check] [--specs DIR] [--out DIR]   compile specs -> generated modules
lora-lite validate PATH...                          validate spec files (exit 1 on error)
lora-lite example [--variant NAME] [--steps N]      attach, train, save, detach, load
lora-lite matrix [--json | --markdown]              every basis x core x modifiers cell: works or refused
lora-lite bench [--quick] ...                       train and evaluate variants (lora-lite bench --help)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _spelled(folder: str) -> Path:
    """`folder` in one spelling (specs, ./specs/, $PWD/specs, x/../specs: specs): relative to the
    current folder when under it or given relative (../mine), else absolute as given. A user
    folder's headers name it, so gen --check agrees with gen however the folder was typed."""
    path = os.path.abspath(folder)  # normalised, symlinks kept
    cwd = os.getcwd()
    under = os.path.commonpath([path, cwd]) == cwd
    return Path(os.path.relpath(path, cwd) if under or not os.path.isabs(folder) else path)


def _gen(args) -> int:
    from lora_lite.codegen import SpecError, check, generate
    from lora_lite.codegen.compiler import HEADER_CMD, GenerateError, commands
    from lora_lite.codegen.spec import shipped_specs_dir

    specs, out = _spelled(args.specs), _spelled(args.out)
    if not specs.is_dir():
        print(f"lora-lite gen: no specs folder at {specs} (run from a checkout or pass --specs)", file=sys.stderr)
        return 2
    # the shipped specs keep their checked-in headers (specs/<file>, just gen); a user's folder
    # gets its spec files and this command line, as given here
    shipped = specs.resolve() == shipped_specs_dir().resolve()
    try:
        if args.check:
            problems = check(specs, out, shipped=shipped)
            for p in problems:
                print(p)
            if problems:
                regen = HEADER_CMD if shipped else commands(specs, out)[0]
                print(f"{len(problems)} generated file(s) out of date; run: {regen}", file=sys.stderr)
                return 1
            print(f"{out}/ is up to date ({len(list(specs.glob('*.yaml')))} specs)")
            return 0
        changed = generate(specs, out, shipped=shipped)
    except (SpecError, GenerateError) as e:
        print(e, file=sys.stderr)
        return 1
    except OSError as e:  # an unwritable or missing folder: one line, no traceback
        print(f"lora-lite gen: cannot write {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 1
    for p in changed:
        print(f"wrote {p}" if p.exists() else f"removed {p}")
    print(f"{len(changed)} file(s) changed")
    return 0


def _validate(args) -> int:
    from lora_lite.codegen import SpecError, load_spec

    bad = 0
    for path in args.paths:
        try:
            spec = load_spec(path)
            print(
                f"{path}: ok ({spec.title}: basis={spec.basis}, core={spec.core}, "
                f"modifiers={[m['kind'] for m in spec.modifiers]}, residual={spec.residual}, hook={spec.hook})"
            )
        except SpecError as e:
            print(e, file=sys.stderr)
            bad += 1
    return 1 if bad else 0


def matrix_markdown(rows: list[dict]) -> str:
    """The works cells as a table: a row per basis, a column per core, the modifiers that work."""
    bases = list(dict.fromkeys(r["basis"] for r in rows))
    cores = list(dict.fromkeys(r["core"] for r in rows))
    cell = {}
    for r in rows:
        if r["status"] == "works":  # residual crop and subtract (or hook output and input) share a cell
            cell.setdefault((r["basis"], r["core"]), {})["+".join(r["modifiers"]) or "plain"] = None
    lines = ["| basis | " + " | ".join(cores) + " |", "|---" * (len(cores) + 1) + "|"]
    for b in bases:
        lines.append(f"| {b} | " + " | ".join(", ".join(cell.get((b, c), [])) or "-" for c in cores) + " |")
    return "\n".join(lines)


def _matrix(args) -> int:
    import json

    from lora_lite.codegen.algebra import matrix
    from lora_lite.codegen.spec import load_spec, shipped_specs_dir

    combos = [tuple(m["kind"] for m in s.modifiers) for s in map(load_spec, sorted(shipped_specs_dir().glob("*.yaml")))]
    rows = matrix(extra=[c for c in combos if len(c) > 1])
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if args.markdown:
        print(matrix_markdown(rows))
        return 0
    for r in rows:
        mods = "+".join(r["modifiers"]) or "-"
        status = "works" if r["status"] == "works" else f"refused: {r['rule']}"
        print(f"{r['basis']:10} {r['core']:12} {mods:10} {r['residual']:9} {r['hook']:7} {status}")
    works = sum(r["status"] == "works" for r in rows)
    print(f"{works} of {len(rows)} cells work", file=sys.stderr)
    return 0


def _example(args) -> int:
    from lora_lite.example import run

    if args.steps < 0:
        print(f"lora-lite example: error: --steps: must be at least 0, got {args.steps}", file=sys.stderr)
        return 2
    try:
        run(args.variant, steps=args.steps, out=args.out)
    except ValueError as e:  # SpecError (a bad --variant), CheckpointError (an unwritable --out), AttachError
        print(f"lora-lite example: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lora-lite`. Output into a pipe closed early (`lora-lite matrix | head`)
    ends the command quietly with exit 1, as Python's own recipe (signal docs, SIGPIPE) does."""
    try:
        rc = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here at the latest, not at interpreter exit
        return rc
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the exit-time flush writes nowhere instead of raising
        return 1


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the bench has its own parser (lora_lite/bench.py)
        from lora_lite.bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="lora-lite", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen", help="compile specs into generated hook modules")
    g.add_argument("--check", action="store_true", help="write nothing; list stale/orphaned files; exit 1 if any")
    g.add_argument("--specs", default="specs", help="folder of spec YAML files (default: specs)")
    g.add_argument("--out", default="generated", help="output folder (default: generated)")
    g.set_defaults(fn=_gen)
    v = sub.add_parser("validate", help="validate spec files against the schema and the compiler")
    v.add_argument("paths", nargs="+")
    v.set_defaults(fn=_validate)
    e = sub.add_parser("example", help="end-to-end example on a tiny model: attach, train, save, detach, load")
    e.add_argument("--variant", default="lora", help="spec name or path (default: lora)")
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--out", default="example-out", help="folder for the adapter checkpoint")
    e.set_defaults(fn=_example)
    mx = sub.add_parser("matrix", help="list every basis x core x modifiers x residual x hook cell and its status")
    mx.add_argument("--json", action="store_true", help="one JSON object per cell")
    mx.add_argument("--markdown", action="store_true", help="the works cells as the README's table")
    mx.set_defaults(fn=_matrix)
    sub.add_parser("bench", help="train and evaluate variants on a causal LM and GSM8K (lora-lite bench --help)")
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
