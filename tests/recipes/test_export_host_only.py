"""``recipes.export`` runs on the host alone: it hides the GPUs from its own process before CUDA starts (a CUDA
context and NCCL cost host memory and start-up time and buy the export nothing), and says when it could not
because CUDA had started earlier in the process."""

import subprocess
import sys

import pytest
import torch

SCRIPT = """
import os, torch
from nemo_mla_lora.recipes.export import keep_off_gpus
{before}
hidden = keep_off_gpus()
print(hidden, repr(os.environ.get("CUDA_VISIBLE_DEVICES")), torch.cuda.is_available())
"""


def _run(before: str = "") -> list[str]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(before=before)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


def test_the_export_process_hides_the_gpus():
    assert _run() == ["True", "''", "False"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_where_cuda_started_first_it_says_so_and_keeps_them():
    assert _run() == ["True", "''", "False"]  # the GPU machine: hidden before CUDA starts
    hidden, _, available = _run("torch.cuda.init()")
    assert (hidden, available) == ("False", "True")  # too late: reported, not pretended
