"""Shared by the tests: the scripts under ``bench/`` as modules. They import their siblings by module name (as
when run as scripts, whose own folder is on the path), so ``bench/`` goes on ``sys.path`` first."""

import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench_module(name: str):
    """``bench/<name>.py`` imported (once per session, as any module).

    Args:
        name: the script's module name, e.g. ``real_size``.
    """
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))  # appended: an installed package wins over a same-named script
    return importlib.import_module(name)
