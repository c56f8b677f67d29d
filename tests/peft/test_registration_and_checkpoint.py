"""NeMo sees MLALoRA by name; adapter-only checkpoints round-trip through dist_checkpointing."""

import torch
from conftest import batch
from test_lora_parity import adapted

import nemo_mla_lora  # noqa: F401  (registers with NeMo)
from nemo_mla_lora.peft import MLALoRA
from nemo_mla_lora.peft.state import adapter_factors, randomize_b


def test_registered_in_nemo_peft_registry():
    from nemo.collections.llm.peft import PEFT_STR2CLS
    from nemo.lightning.pytorch.callbacks.peft import PEFT

    cls = PEFT_STR2CLS["mla_lora"]
    assert cls is MLALoRA and issubclass(cls, PEFT)
    peft = cls(placement="kv_up", dim=8, alpha=16)
    assert peft.requested_targets == ("linear_kv_up_proj",)


def test_nemo_io_config_round_trip():
    """NeMo serialises a PEFT through its fiddle IO config (what llm.finetune checkpoints carry)."""
    import fiddle as fdl

    peft = MLALoRA(placement="safe", dim=8, alpha=16, parts={})
    rebuilt = fdl.build(peft.__io__)
    assert isinstance(rebuilt, MLALoRA) and (rebuilt.placement, rebuilt.dim, rebuilt.alpha) == ("safe", 8, 16)


def test_adapter_only_dist_checkpoint_round_trip(mcore, tmp_path):
    from megatron.core import dist_checkpointing

    model, _ = adapted(
        "q_lora",
        MLALoRA(
            placement="all_linear", dim=4, alpha=8, parts={"linear_kv_up_proj": "v", "linear_kv_down_proj": "latent"}
        ),
    )
    adapter_sd = {k: v for k, v in model.sharded_state_dict().items() if ".adapter." in k}
    assert adapter_sd and all("lora_" in k for k in adapter_sd)
    dist_checkpointing.save(adapter_sd, str(tmp_path))

    fresh, _ = adapted(
        "q_lora",
        MLALoRA(
            placement="all_linear", dim=4, alpha=8, parts={"linear_kv_up_proj": "v", "linear_kv_down_proj": "latent"}
        ),
        seed=0,
    )
    randomize_b(fresh, seed=99)  # different adapters, same base
    target = {k: v for k, v in fresh.sharded_state_dict().items() if ".adapter." in k}
    loaded = dist_checkpointing.load(target, str(tmp_path))
    fresh.load_state_dict(loaded, strict=False)
    for (na, (a1, b1, _)), (nb, (a2, b2, _)) in zip(adapter_factors(model).items(), adapter_factors(fresh).items()):
        assert na == nb and torch.equal(a1, a2) and torch.equal(b1, b2)
    tokens, positions, mask = batch()
    with torch.no_grad():
        assert torch.equal(model(tokens, positions, mask), fresh(tokens, positions, mask))
