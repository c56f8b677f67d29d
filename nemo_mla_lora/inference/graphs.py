"""One decode step of ``AbsorbedMLAEngine`` captured in a CUDA graph and replayed per token, as serving engines
run decode (the host launches one graph instead of every layer's kernels).

A graph replays fixed shapes at fixed addresses, so the cache runs ``static`` (attention over the whole
allocation, each row masked by its own length on the device) and advances in place (``advance(step=1)``), the
tokens go through one input buffer and the logits come out of one output buffer. The host keeps the cache's
count itself (no Python runs inside a replay). MoE layers run as the engine's grouped GEMMs (``moe.py``), which
never read the device back; where ``torch._grouped_mm`` cannot run their operands (not bf16 on sm_90+), or the
layer is one ``GroupedMoE`` does not stand in for, Megatron's token dispatcher would read expert counts back to
the host, which a graph cannot replay: such models decode eagerly.

Index legend: b batch, v vocabulary.
"""

import torch

from nemo_mla_lora.inference.kernels import graph_choice


def graph_unsafe(engine) -> str | None:
    """Why ``engine``'s decode step cannot be captured (None: it can)."""
    p = next(engine.model.parameters())
    if p.device.type != "cuda":
        return f"CUDA graphs need the model on a GPU; it is on {p.device}"
    probe = torch.empty(1, engine.spec.hidden_size, dtype=p.dtype, device=p.device)  # a row of the MoE input
    for i, layer in enumerate(engine.model.decoder.layers):
        if not hasattr(layer.mlp, "router"):
            continue
        moe = engine.moe[i]
        why = "the token dispatcher syncs with the host" if moe is None else moe.graph_problem(probe)
        if why is not None:
            return f"layer {i} is MoE and {why}"
    return None


class GraphedDecode:
    """``step(tokens [b]) -> logits [b, v]``: the engine's decode step for ``cache`` (static, after its prefill),
    replayed from a CUDA graph.

    Args:
        engine: an ``AbsorbedMLAEngine`` on a GPU (``graph_unsafe`` says why not where it cannot be captured).
        cache: its ``LatentKVCache`` with ``static=True``, prefilled; every row advances one token per step.
        bank, adapter_ids: per-row unmerged adapters, fixed for the graph's life.
        warmup: eager steps before the capture (kernels compiled, workspaces allocated); their cache writes lie
            past every row's length and their advance is undone.
    """

    def __init__(self, engine, cache, bank=None, adapter_ids=None, warmup: int = 2):
        why = graph_unsafe(engine)
        if why is None and not cache.static:
            why = "the cache is not static (LatentKVCache.static=True: fixed shapes across steps)"
        if why is not None:
            raise ValueError(f"GraphedDecode: {why}")
        self.engine, self.cache, self.bank, self.adapter_ids = engine, cache, bank, adapter_ids
        self.tokens = torch.zeros(cache.lengths.shape[0], 1, dtype=torch.long, device=cache.lengths.device)  # [b, 1]
        self._check_room(warmup + 1)
        lengths, length = cache.lengths.clone(), cache.length
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), graph_choice.graphed_choice():  # the kernels the capture will launch
            for _ in range(warmup):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self._restore(lengths, length)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()  # [b, v]
        self._restore(lengths, length)

    def _forward(self) -> torch.Tensor:
        return self.engine.forward(self.tokens, self.cache, self.bank, self.adapter_ids)[:, -1]

    def _restore(self, lengths: torch.Tensor, length: int) -> None:
        self.cache.lengths.copy_(lengths)
        self.cache.length = length

    def _check_room(self, steps: int) -> None:
        if self.cache.length + steps > self.cache.max_length:
            raise ValueError(
                f"the cache holds {self.cache.max_length} tokens per row; {self.cache.length} are used and "
                f"{steps} more were asked for"
            )

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b] placed after each row's cached tokens -> logits [b, v] (the graph's output buffer: read or
        copy it before the next step)."""
        self._check_room(1)
        self.tokens.copy_(tokens.view(-1, 1))
        self.graph.replay()
        self.cache.length += 1
        return self.logits
