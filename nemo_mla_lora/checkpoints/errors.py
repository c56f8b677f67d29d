"""The errors every checkpoint reader and writer raises: a file, tensor or field that is missing, malformed or
does not match what was recorded for it."""


class CheckpointError(ValueError):
    """A checkpoint (ours, HF, NeMo 2, an adapter or an export) that cannot be read as it claims to be."""


class ChecksumError(CheckpointError):
    """A tensor whose bytes do not match the checksum its export's ``manifest.json`` recorded."""
