# The README's two commands.
.PHONY: run test setup

setup:
	./scripts/setup.sh

# The main job: LoRA fine-tune of the embedded tiny MLA model on CPU, then export + verify.
run: setup
	.venv/bin/python -m nemo_mla_lora.recipes.finetune

# The test suite (CPU; GPU tests are marked and skipped).
test: setup
	.venv/bin/python -m pytest -q
