import os
import warnings

import pytest
import torch

from nemo_mla_lora.runtime.parallel import free_port

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
