"""Data for NeMo's ``llm.finetune``: the tokenizer and NeMo's own data modules.

``data.kind=squad``: NeMo's ``SquadDataModule`` (the official recipe's data). ``data.kind=jsonl``: our
prompt/answer (or input/output, or SQuAD) JSONL files, staged as NeMo's ``{"input", "output"}`` records
under ``<output_dir>/nemo_data/<name>/`` and read by NeMo's ``FineTuningDataModule`` (answer-only loss,
causal attention masks from its collate function).

``data.tokenizer``: ``byte`` (NeMo's ``ByteLevelTokenizer``, 512 ids: the small GPU model), an HF id or
path (NeMo's ``AutoTokenizer``), or unset: the one stored in the restored base checkpoint's context.
"""

import json
from pathlib import Path

from nemo_mla_lora.data import resolve
from nemo_mla_lora.data.prompt_answer import read_jsonl


def make_tokenizer(name):
    if name is None:
        return None
    if name == "byte":
        from nemo.collections.common.tokenizers.bytelevel_tokenizers import ByteLevelTokenizer

        return ByteLevelTokenizer()
    from nemo.collections.common.tokenizers import AutoTokenizer

    return AutoTokenizer(name)


def stage_jsonl(train: str, validation: str, root) -> Path:
    """Write ``training.jsonl`` / ``validation.jsonl`` as NeMo's input/output records; returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for source, name in ((train, "training.jsonl"), (validation, "validation.jsonl")):
        with open(root / name, "w") as f:
            for prompt, answer in read_jsonl(resolve(source)):
                f.write(json.dumps({"input": prompt, "output": answer}) + "\n")
    return root


def data_module(cfg, tokenizer, train: str, validation: str, root):
    """NeMo data module for ``cfg.data`` with the trainer's batch sizes."""
    from nemo.collections import llm

    t, d = cfg.trainer, cfg.data
    batches = dict(seq_length=d.seq_length, micro_batch_size=t.micro_batch_size,
                   global_batch_size=t.global_batch_size, tokenizer=tokenizer, seed=cfg.seed, num_workers=2)
    if d.kind == "squad":
        return llm.SquadDataModule(packed_sequence_specs=None, **batches)
    from nemo.collections.llm.gpt.data.fine_tuning import FineTuningDataModule

    return FineTuningDataModule(dataset_root=str(stage_jsonl(train, validation, root)), **batches)
