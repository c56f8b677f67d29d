# The README's commands, plus lint and the fast test tier.
.PHONY: run test test-fast lint format setup

setup:
	./scripts/setup.sh

# The main job: LoRA fine-tune of the embedded tiny MLA model on CPU, then export + verify.
run: setup
	.venv/bin/python -m nemo_mla_lora.recipes.finetune

# The test suite (CPU; GPU tests are marked and skipped); the 15 slowest tests are listed at the end.
test: setup
	.venv/bin/python -m pytest -q --durations=15

# The unit tier: everything not marked slow (no spawned processes, no training runs, no installs); under 3 minutes.
test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow" --durations=15

# ruff: lint (rules in pyproject.toml) and the formatting check.
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# Rewrite the tree in ruff's format and apply ruff's safe fixes.
format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .
