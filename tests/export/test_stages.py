"""The export's three stages (``export/stages.py``): every unit read, processed and written in order, at most
three in memory, and a unit ``alone`` marks (the embedding, the output layer) in memory by itself; an error in
any stage is raised in the caller."""

import threading
import time

import pytest

from nemo_mla_lora.export import stages


def _run(units: list, alone=None, fail_at=None) -> tuple[list, list, list]:
    """(what was written, the units in memory each time one was read, the most in memory at once)."""
    held, lock, seen, most, written = set(), threading.Lock(), [], [0], []

    def read(u):
        if u == fail_at:
            raise RuntimeError(f"read {u} failed")
        with lock:
            held.add(u)
            seen.append((u, frozenset(held)))
            most[0] = max(most[0], len(held))
        time.sleep(0.002)  # let the stages overlap
        return [u]

    def write(u, tensors):
        time.sleep(0.004)
        written.append((u, tensors))
        with lock:
            held.discard(u)

    stages.run(units, read, lambda u, t: t + ["processed"], write, alone=alone)
    return written, seen, most[0]


def test_units_go_through_in_order_with_three_in_memory_at_most():
    units = list(range(12))
    written, _, most = _run(units)
    assert written == [(u, [u, "processed"]) for u in units]
    assert most == 3


def test_a_large_unit_is_in_memory_by_itself():
    units = ["pre", 0, 1, 2, 3, "post"]
    written, seen, _ = _run(units, alone=lambda u: isinstance(u, str))
    assert [u for u, _ in written] == units
    for u, in_memory in seen:
        if isinstance(u, str):  # read once every unit before it was written
            assert in_memory == {u}, (u, in_memory)
        else:  # and nothing read while it was held
            assert not any(isinstance(v, str) for v in in_memory), (u, in_memory)


def test_an_error_in_a_stage_is_raised_here():
    with pytest.raises(RuntimeError, match="read 3 failed"):
        _run(list(range(6)), fail_at=3)


def test_each_written_unit_hands_its_freed_memory_back(monkeypatch, tmp_path):
    """The export asks malloc to return freed memory after every unit (``runtime/memory.py``; glibc here)."""
    from nemo_mla_lora.export import pipeline
    from nemo_mla_lora.runtime.memory import release_freed_memory

    assert release_freed_memory()  # glibc on Linux: malloc_trim is there
    calls, written = [], []
    monkeypatch.setattr(pipeline, "release_freed_memory", lambda: calls.append(1))
    run = stages.run

    def counting(units, read, process, write, on_done=None, alone=None):
        def done(u):
            written.append(u)
            on_done(u)

        return run(units, read, process, write, on_done=done, alone=alone)

    monkeypatch.setattr(stages, "run", counting)
    _export_tiny(tmp_path)
    assert written and len(calls) == len(written)


def _export_tiny(tmp_path):
    from support.hf import MAKER

    from nemo_mla_lora.export.pipeline import export

    base = MAKER.make("v3_noaux_yarn_q", tmp_path / "base")
    return export(base, None, tmp_path / "out", fmt="hf", progress=False)
