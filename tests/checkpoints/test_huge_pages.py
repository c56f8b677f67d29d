"""``runtime.memory.advise_huge_pages``: a large read buffer is backed by transparent huge pages once written (read
from the kernel's own account, /proc/self/smaps), where the kernel offers them; small or non-CPU buffers are left
alone; and a safetensors read into such a buffer gives the same bytes."""

import re
from pathlib import Path

import pytest
import torch

from nemo_mla_lora.runtime.memory import MIN_HUGE_BYTES, advise_huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _huge_bytes_at(address: int) -> int:
    """AnonHugePages (bytes) of the mapping of this process that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head[1], 16) <= address < int(head[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="the kernel offers no huge pages")
def test_a_large_buffer_is_backed_by_huge_pages_once_written():
    t = advise_huge_pages(torch.empty(64 << 20, dtype=torch.uint8))
    t.fill_(1)  # the pages are faulted in now
    assert _huge_bytes_at(t.data_ptr() + (32 << 20)) > 0


def test_small_and_empty_buffers_are_returned_as_they_are():
    small = torch.empty(MIN_HUGE_BYTES // 2, dtype=torch.uint8)
    assert advise_huge_pages(small) is small
    assert advise_huge_pages(torch.empty(0)).numel() == 0


def test_a_read_into_an_advised_buffer_gives_the_same_bytes(tmp_path):
    from safetensors.torch import save_file

    from nemo_mla_lora.checkpoints.safetensors_io import SafetensorsFile

    want = torch.randn(1024, 2048, dtype=torch.float32)  # 8 MiB: advised
    save_file({"w": want}, str(tmp_path / "a.safetensors"))
    got = SafetensorsFile(tmp_path / "a.safetensors").read("w")
    assert torch.equal(got, want)
