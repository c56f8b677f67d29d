"""Fixtures and helpers every test folder shares (tests/ is on pytest's pythonpath: ``from conftest import batch``)."""

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from nemo_mla_lora.runtime.parallel import free_port

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # studies/ lives outside the package; appended, so an installed nemo_mla_lora wins
    sys.path.append(str(ROOT))


@pytest.fixture(scope="session")
def mcore():
    """One process-wide Megatron init (TP=PP=EP=1, gloo on CPU)."""
    from nemo_mla_lora.runtime import parallel

    parallel.init_megatron(port=free_port())
    yield
    parallel.destroy()


def batch(seq: int = 12, size: int = 2, vocab: int = 264, seed: int = 0):
    """tokens [b, s], position ids [b, s], causal mask [1, 1, s, s] (True = masked)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (size, seq), generator=gen)
    positions = torch.arange(seq).expand(size, seq)
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)
    return tokens, positions, mask


def perturb_norms_and_bias(model, seed: int = 1):
    """Non-trivial norm weights and router expert bias, so parity tests exercise them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not isinstance(t, torch.Tensor):
                continue
            if "layernorm.weight" in name or name.endswith("layer_norm_weight"):  # local or TE-fused norms
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype))
            elif name.endswith("expert_bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype))


PARTS = {"linear_kv_up_proj": "k", "linear_kv_down_proj": "latent"}  # the part-selective adapters of ``trained``


@pytest.fixture(scope="module", params=["q_lora", "no_q_lora"])
def trained(request, mcore, tmp_path_factory):
    """A base checkpoint and an adapter checkpoint of a tiny model (all linears, B != 0, part-selective kv) on disk,
    and the live unmerged model (the export and serving tests)."""
    from nemo_mla_lora.arch.mla_spec import MLASpec
    from nemo_mla_lora.checkpoints import dist_ckpt
    from nemo_mla_lora.models.tiny import build_model, tiny_mla_config, tiny_mla_noq_config
    from nemo_mla_lora.peft import MLALoRA
    from nemo_mla_lora.peft.state import randomize_b

    make = tiny_mla_config if request.param == "q_lora" else tiny_mla_noq_config
    config = make()
    spec = MLASpec.from_megatron(config)
    torch.manual_seed(0)
    model = build_model(config).eval()
    perturb_norms_and_bias(model)
    root = tmp_path_factory.mktemp(request.param)
    dist_ckpt.save_base(model, spec, root / "base")
    peft = MLALoRA(placement="all_linear", dim=4, alpha=8, parts=PARTS)
    model = peft(model)
    randomize_b(model)
    dist_ckpt.save_adapter(model, peft, spec, root / "adapter", base_dir=root / "base")
    return dict(root=root, model=model, spec=spec, peft=peft)


def megatron_ddp_hooks(params, main_dtype):
    """What Megatron's DDP does to trainable parameters, on the CPU: a ``main_grad`` buffer each (filled here, as
    an earlier micro-batch would leave it), ``grad_added_to_main_grad`` False, and Megatron's own backward hook on
    each parameter's gradient accumulator (as its DDP registers it). Returns (the filled values, (the accumulators,
    kept alive, and the bucket stand-in whose ``ready`` lists the parameters the hook reported))."""
    import types

    from megatron.core.distributed.distributed_data_parallel import DistributedDataParallel

    bucket = types.SimpleNamespace(ready=[], register_grad_ready=lambda p: bucket.ready.append(p))
    ddp = types.SimpleNamespace(  # overlap on: the hook asserts a gradient came (None would hang a real bucket)
        param_to_bucket_group=dict.fromkeys(params, bucket), ddp_config=types.SimpleNamespace(overlap_grad_reduce=True)
    )
    before, accs = [], []
    for p in params:
        p.main_grad = torch.randn(p.shape, dtype=main_dtype, device=p.device)
        p.grad_added_to_main_grad = False
        before.append(p.main_grad.clone())
        acc = p.expand_as(p).grad_fn.next_functions[0][0]
        acc.register_hook(DistributedDataParallel._make_backward_post_hook(ddp, p))
        accs.append(acc)
    return before, (accs, bucket)
