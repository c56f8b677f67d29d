"""Training drivers: a plain Lightning path on CPU, NeMo's llm.finetune on GPUs."""
