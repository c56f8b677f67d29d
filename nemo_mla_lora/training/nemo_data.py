"""Data for NeMo's ``llm.finetune``: the tokenizer and NeMo's own data modules.

``data.kind=squad``: NeMo's ``SquadDataModule`` (the official recipe's data). ``data.kind=jsonl``: our
prompt/answer (or input/output, or SQuAD) JSONL files, staged as NeMo's ``{"input", "output"}`` records
under ``<output_dir>/nemo_data/<name>/`` and read by NeMo's ``FineTuningDataModule`` (answer-only loss,
causal attention masks from its collate function).

``data.tokenizer``: ``byte`` (NeMo's ``ByteLevelTokenizer``, 512 ids: the small GPU model), an HF id or
path (NeMo's ``AutoTokenizer``), or unset: the one stored in the restored base checkpoint's context.
"""

import json
import logging
from pathlib import Path

from nemo_mla_lora.data import resolve
from nemo_mla_lora.data.prompt_answer import DataError, read_jsonl

log = logging.getLogger(__name__)
TOKENIZER_DIR = ("context", "nemo_tokenizer")  # a NeMo checkpoint's HF tokenizer files


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
    batches = dict(
        seq_length=d.seq_length,
        micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size,
        tokenizer=tokenizer,
        seed=cfg.seed,
        num_workers=2,
    )
    if d.kind == "squad":
        return llm.SquadDataModule(packed_sequence_specs=None, **batches)
    from nemo.collections.llm.gpt.data.fine_tuning import FineTuningDataModule

    return FineTuningDataModule(dataset_root=str(stage_jsonl(train, validation, root)), **batches)


def counting_tokenizer(cfg):
    """The run's tokenizer as our ``data.tokenizer`` loader gives it (no NeMo import): ``data.tokenizer``
    (``byte``: the same UTF-8 byte ids' count as NeMo's ByteLevelTokenizer), else the checkpoint's own HF files
    (an HF directory's, or a NeMo checkpoint's ``context/nemo_tokenizer``); None when there is none to read."""
    from nemo_mla_lora.data import tokenizer

    if cfg.data.tokenizer:
        return tokenizer.load(cfg.data.tokenizer)
    checkpoint = cfg.model.checkpoint
    for candidate in (Path(checkpoint), Path(checkpoint).joinpath(*TOKENIZER_DIR)) if checkpoint else ():
        if tokenizer.has_hf_tokenizer(candidate):
            return tokenizer.load(str(candidate))
    return None


def check_fit(where, examples, seq_length: int, tok) -> None:
    """Refuse a JSONL set none of whose examples NeMo would train as written; warn with the count when some.

    NeMo's ``GPTSFTDataset`` (``truncation_field=input``, ``truncation_method=right``) fits an example longer
    than ``seq_length`` (prompt + answer + EOS, no BOS, both stripped of spaces) by cutting the end of its prompt:
    the answer stays, the question it answers goes.

    Args:
        where: the data file, named in the messages.
        examples: its (prompt, answer) records.
        seq_length: ``data.seq_length``.
        tok: the run's tokenizer (``counting_tokenizer``).
    """
    prompts = [len(tok.encode(p.strip(" "))) for p, _ in examples]
    cut = sum(p + len(tok.encode(a.strip(" "))) + 1 > seq_length for p, (_, a) in zip(prompts, examples))
    if not cut:
        return
    message = (
        f"{where}: {cut} of {len(examples)} examples are longer than data.seq_length={seq_length} (prompt + "
        f"answer + EOS; the longest prompt is {max(prompts)} tokens); NeMo keeps each answer and cuts the end "
        "of its prompt (truncation_field=input)"
    )
    if cut == len(examples):
        raise DataError(f"{message}: no example would train as written; raise data.seq_length or shorten the prompts")
    log.warning("%s", message)


def check_jsonl(cfg) -> None:
    """``data.kind=jsonl`` for NeMo, checked before NeMo is handed the files (``check_fit`` on each set the run
    stages: train, validation and, to make a base, ``data.base_pretrain``). Without a tokenizer to count with
    (a NeMo checkpoint whose context holds none), says so and checks only that the files read.

    Args:
        cfg: the composed finetune config (``trainer=megatron``).
    """
    d = cfg.data
    if d.kind != "jsonl":
        return
    sets = [d.train, d.validation] + ([d.base_pretrain] if d.base_pretrain and not cfg.model.checkpoint else [])
    records = {path: read_jsonl(resolve(path)) for path in sets}
    tok = counting_tokenizer(cfg)
    if tok is None:
        log.warning("no tokenizer to count data.seq_length with (set data.tokenizer): the JSONL lengths are unchecked")
        return
    for path, examples in records.items():
        check_fit(resolve(path), examples, d.seq_length, tok)
