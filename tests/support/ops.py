"""Counting the aten ops a piece of code runs (what a fused path saves, checked on the CPU)."""

from torch.profiler import ProfilerActivity, profile


def op_counts(fn, top_level: bool = False) -> dict:
    """aten ops run by ``fn`` (forward + backward), by name; ``top_level``: only those not run inside another aten
    op (a CPU multi-tensor op runs one op per tensor inside itself)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = {}
    for event in prof.events():
        if event.name.startswith("aten::") and not (top_level and inside_aten(event)):
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def inside_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False
