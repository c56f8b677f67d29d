"""Code run in a fresh Python: for Triton's interpreter, which must be switched on before triton is imported."""

import os
import subprocess
import sys


def child(code: str, *args, interpret: bool, timeout: int = 600) -> str:
    """``code`` run in a fresh Python (with ``TRITON_INTERPRET=1`` where ``interpret``): its last line of output."""
    env = dict(os.environ, TRITON_INTERPRET="1") if interpret else None
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def interpreted(code: str, *args) -> str:
    """``code`` in Triton's interpreter, on CPU tensors: its last line of output."""
    return child(code, *args, interpret=True)
