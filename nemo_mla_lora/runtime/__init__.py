"""Runtime shims and process plumbing: torch.distributed / Megatron process groups (``parallel``), helper
processes that die with their parent (``processes``), and the shims for a machine without CUDA (``cpu_compat``)
or without Transformer Engine (``te_compat``). Imports nothing else of this package.
"""
