"""Tokenizers: the byte tokenizer of the embedded tiny models, or a checkpoint's own HF tokenizer.

The byte tokenizer (offline, no files): ids 0..255 are bytes, then BOS, EOS, PAD. ``load(name)`` gives one
interface for both (``encode`` without special tokens, ``bos``/``eos``/``pad`` ids, ``decode``), used by the
CPU trainer's data and by ``recipes.generate``; NeMo's trainer uses NeMo's own tokenizers (nemo_data.py).
"""

from pathlib import Path

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class ByteTokenizer:
    name, bos, eos, pad, vocab_size = "byte", BOS, EOS, PAD, VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def decode(self, ids) -> str:
        return decode(ids)


class HFTokenizer:
    """An HF tokenizer (a checkpoint directory's tokenizer files, or a hub id already in the local cache)."""

    def __init__(self, name: str):
        from transformers import AutoTokenizer

        self.name = name
        self.hf = AutoTokenizer.from_pretrained(name)
        if self.hf.eos_token_id is None:
            raise ValueError(f"tokenizer {name}: no EOS token (needed to end answers and generation)")
        self.eos = self.hf.eos_token_id
        self.bos = self.hf.bos_token_id
        self.pad = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos
        self.vocab_size = len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


def load(name: str):
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def copy_tokenizer(source, directory) -> list[str]:
    """``source``'s tokenizer (and generation config) files, copied into ``directory``: beside exported weights
    (serving engines - vLLM, transformers, ``recipes.generate`` - read them from the model directory), or alone
    into a NeMo context's tokenizer folder. Returns the names copied."""
    import shutil

    copied = [f for f in TOKENIZER_FILES if (Path(source) / f).is_file()]
    for f in copied:
        shutil.copyfile(Path(source) / f, Path(directory) / f)
    return copied


def has_hf_tokenizer(directory) -> bool:
    d = Path(directory)
    return any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def for_run(tokenizer: str | None, checkpoint: str | None, key: str = "data.tokenizer") -> str:
    """The tokenizer a run uses: ``tokenizer`` if given, else the checkpoint's own files, else byte (tiny models).

    Args:
        tokenizer: the configured tokenizer (``byte``, an HF id/path) or None.
        checkpoint: the model directory whose own tokenizer files are used when ``tokenizer`` is None.
        key: the config key that sets ``tokenizer`` (``data.tokenizer`` in finetune, ``tokenizer`` in
            generate), named when an HF checkpoint has no tokenizer files.
    """
    if tokenizer:
        return tokenizer
    if checkpoint and has_hf_tokenizer(checkpoint):
        return str(checkpoint)
    if checkpoint and (Path(checkpoint) / "config.json").is_file():
        raise ValueError(
            f"{checkpoint} has no tokenizer files; set {key}=<an HF tokenizer id or path> "
            f"(or {key}=byte for the byte-level tiny models)"
        )
    return "byte"


def prompt_ids(tok, text: str) -> list[int]:
    """A prompt's ids as the model saw them in training: BOS (where the tokenizer has one), then the text."""
    return ([tok.bos] if tok.bos is not None else []) + tok.encode(text)


def check_fits(tok, vocab_size: int, where: str) -> None:
    """Fail early if the tokenizer's ids do not fit the model's embedding."""
    if tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size} ids; {where} has vocab_size {vocab_size}")
