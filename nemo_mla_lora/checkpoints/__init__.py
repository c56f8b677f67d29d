"""Checkpoint I/O: every reader and writer of a checkpoint format that is not the export pipeline itself.

- ``dist_ckpt``: our base and adapter checkpoints (Megatron dist-checkpoints + a JSON sidecar), sharded layouts.
- ``dist_reader`` / ``dist_stream``: a dist-checkpoint read by flat name / written unit by unit.
- ``safetensors_io``: safetensors read and written tensor by tensor; a directory's content hash.
- ``sources``: bases (ours, HF bf16/FP8, NeMo 2) and adapters (ours, HF PEFT: ``hf_peft``, ``hf_peft_config``).
- ``kind``: what a checkpoint directory is and the ``MLASpec`` it holds.
- ``safe_load``: restricted unpickling; ``checksums``: per-tensor checksums; ``errors``: the errors raised.
- ``output_dir``: writing an output directory that cannot destroy (checks, lock, temp dir, rename).
"""
