"""Kernel choices made for CUDA graphs: some decode kernels are faster replayed from a graph than called eagerly
(their host work per call no longer counts), so ``hopper_decode.decode_attention`` and the ``flashmla`` backend
choose per shape with ``for_graph``: True inside a stream capture, and inside ``graphed_choice`` (which
``graphs.GraphedDecode`` holds over its eager warm-up steps, so that they compile and load the kernels its capture
then launches).
"""

import contextlib
import contextvars

import torch

_GRAPHED = contextvars.ContextVar("graphed_choice", default=False)


@contextlib.contextmanager
def graphed_choice():
    """Inside, the decode kernels are chosen as for a CUDA graph (eager calls included)."""
    token = _GRAPHED.set(True)
    try:
        yield
    finally:
        _GRAPHED.reset(token)


def for_graph() -> bool:
    """Whether kernels are chosen as for a CUDA graph: inside ``graphed_choice`` or a stream capture (host queries
    only)."""
    return _GRAPHED.get() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
