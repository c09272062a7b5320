# lora-lite habits. `just --list` shows them.

# compile specs/*.yaml into generated/ (writes only changed files, removes orphans)
gen:
    lora-lite gen

# fail if generated/ is stale, missing or has orphans (writes nothing)
gen-check:
    lora-lite gen --check

# validate every spec against the schema and the compiler
validate:
    lora-lite validate specs/*.yaml

# run the test suite (the README's test command)
test:
    python -m pytest

# lint and format-check hand-written and generated code alike
lint:
    ruff check lora_lite codegen generated tests benchmarks
    ruff format --check lora_lite codegen generated tests benchmarks

# everything CI runs: generated code up to date, lint, tests
check: gen-check validate lint test

# rewrite the numerical goldens after an intended change (review the diff!)
golden:
    python -m pytest tests/test_golden_numeric.py --update-golden

# end-to-end example on a tiny model: attach, train, save, detach, load
example variant="lora":
    lora-lite example --variant {{variant}}

# speed and peak memory vs PEFT and the frozen-base limit (benchmarks/speed.py; model=qwen3-0.6b-shape device=cuda on a GPU)
bench-speed model="tiny" device="cpu" *args="":
    python benchmarks/speed.py --model {{model}} --device {{device}} {{args}}
