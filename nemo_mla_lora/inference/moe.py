"""Megatron's MoE layer for the engine, without its token dispatcher: the same router, the routed experts as two
grouped GEMMs over the experts' own weights, the shared experts, and no read of the device by the host.

Megatron's dispatcher and ``SequentialMLP`` read the tokens per expert back to the host (``tolist``) and run one
chain of GEMMs per expert from Python: a synchronisation per MoE layer and step, which a CUDA graph cannot replay,
and 64-256 expert chains of launches per layer in an eager decode step. Here, per MoE layer:

    probs, map = router(x)                       Megatron's own router: probs [t, E], map [t, E] (k per row)
    w, e       = top-k of probs on the map       [t, k] weights and experts
    order      = stable argsort of e             the t k (token, expert) rows grouped by expert
    offs       = cumsum(rows per expert)         [E], on the device
    h          = x[order // k] W1_e^T            [t k, 2f]  one grouped GEMM (torch._grouped_mm, offs)
    a          = (silu(h_gate) h_up) w           [t k, f]   as Megatron's expert MLP scales by the probs
    y          = sum over k of a W2_e^T          [t, hidden] one grouped GEMM, rows put back in (token, k) order
    y         += shared_experts(x)

W1 / W2 are the experts' fc1 / fc2 weights stacked once; each expert's parameters become views of the stack, so the
weights are held once. Where ``torch._grouped_mm`` cannot run the operands (``peft.lora_fn.grouped_mm_native``) the
GEMMs fall back to one per expert, which reads the counts back to the host (eager only).

Index legend: t tokens (s b), k experts per token, E experts, f the experts' ffn width.
"""

import torch
from torch.nn import functional as F

from nemo_mla_lora.peft.lora_fn import grouped_mm, grouped_mm_native


def unsupported(mlp: torch.nn.Module) -> str | None:
    """Why ``GroupedMoE`` cannot stand in for ``mlp`` (None: it can): a Megatron MoE layer with ``SequentialMLP``
    experts (gated SiLU, no bias), no token dropping, one expert-parallel rank.

    Args:
        mlp: a decoder layer's ``mlp`` (a dense MLP gives its reason too).
    """
    experts = getattr(mlp, "experts", None)
    if not hasattr(mlp, "router") or experts is None or not hasattr(experts, "local_experts"):
        return f"{type(mlp).__name__} is not a MoE layer with SequentialMLP experts"
    c = mlp.config
    if not c.gated_linear_unit or c.activation_func is not F.silu or c.add_bias_linear:
        return "the experts are not gated SiLU without bias (DeepSeek's)"
    if c.moe_expert_capacity_factor is not None or c.moe_apply_probs_on_input:
        return "token dropping or probs on the input"
    if len(experts.local_experts) != c.num_moe_experts:
        return f"{len(experts.local_experts)} of {c.num_moe_experts} experts on this rank (expert parallelism)"
    return None


class GroupedMoE:
    """``mlp``'s forward (a Megatron MoE layer, ``unsupported`` says which) as grouped GEMMs: ``(y, None)`` for
    x [s, b, hidden], as the layer returns. Building it stacks the experts' weights and makes each expert's
    parameters views of the stack (the layer itself still runs, on the same memory).

    Args:
        mlp: the MoE layer (router, ``SequentialMLP`` experts, optional shared experts).
    """

    def __init__(self, mlp: torch.nn.Module):
        if (why := unsupported(mlp)) is not None:
            raise ValueError(f"GroupedMoE: {why}")
        self.router, self.shared = mlp.router, getattr(mlp, "shared_experts", None)
        self.topk = mlp.router.topk
        experts = mlp.experts.local_experts
        self.w1 = _stack([e.linear_fc1 for e in experts]).transpose(1, 2)  # [E, hidden, 2f]
        self.w2 = _stack([e.linear_fc2 for e in experts]).transpose(1, 2)  # [E, f, hidden]

    def graph_problem(self, x: torch.Tensor) -> str | None:
        """Why a CUDA graph cannot replay this layer for inputs like x [..., hidden] (None: it can).

        Args:
            x: an input of the dtype and device the layer will run on (one row is enough).
        """
        if not x.is_cuda:
            return f"the layer runs on {x.device}"
        probe = x.reshape(-1, x.shape[-1])[:1].contiguous()  # [1, hidden]: dtype, device, alignment of x's rows
        if not grouped_mm_native(probe, self.w1):
            return f"torch._grouped_mm does not run {x.dtype} x {self.w1.dtype} on this GPU: one GEMM per expert"
        return None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """x [s, b, hidden] -> (the layer's output [s, b, hidden], None: no bias), as ``mlp(x)`` returns."""
        shape, k = x.shape, self.topk
        x2 = x.reshape(-1, shape[-1])  # [t, hidden]
        probs, routing_map = self.router(x)  # [t, E] each, k experts per row
        weights, experts = probs.masked_fill(~routing_map, -1.0).topk(k, dim=-1)  # [t, k]
        flat = experts.reshape(-1)  # [t k]
        order = flat.argsort(stable=True)  # [t k]: rows grouped by expert, tokens in order within
        counts = torch.zeros(self.w1.shape[0], dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E]
        offs = counts.cumsum(0).to(torch.int32)  # [E], group end rows
        h = _grouped(x2[order // k], self.w1, offs, counts)  # [t k, 2f]
        gate, up = h.chunk(2, dim=-1)  # [t k, f] each
        act = (F.silu(gate) * up * weights.reshape(-1)[order, None]).to(x.dtype)  # [t k, f]
        out = _grouped(act, self.w2, offs, counts)  # [t k, hidden], grouped by expert
        y = torch.empty_like(out).index_copy_(0, order, out).view(-1, k, shape[-1]).sum(1)  # [t, hidden]
        if self.shared is not None:
            y = y + self.shared(x).reshape(y.shape)
        return y.view(shape), None


def _stack(linears: list) -> torch.Tensor:
    """[E, out, in]: the linears' weights in one tensor, each linear's weight then a view of its row."""
    stacked = torch.stack([lin.weight.detach() for lin in linears])
    for i, lin in enumerate(linears):
        lin.weight.data = stacked[i]
    return stacked


def _grouped(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """a [t, n] (rows grouped by expert) @ b[e] [n, m] per group -> [t, m]; one GEMM per expert (counts read
    back to the host) where ``torch._grouped_mm`` cannot run the operands."""
    if grouped_mm_native(a, b):
        return torch._grouped_mm(a, b, offs)
    return grouped_mm(a, b, offs, counts.tolist())
