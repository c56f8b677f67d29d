"""Compose a config from ``nemo_mla_lora.conf`` without running a job (tests, notebooks, tools)."""

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from omegaconf import OmegaConf

from nemo_mla_lora.config.schema import register
from nemo_mla_lora.config.validate import validate

CONFIG_MODULE = "nemo_mla_lora.conf"


def compose(config_name: str = "finetune", overrides=(), check: bool = True):
    """The composed, resolved config (``finetune`` validated).

    Args:
        config_name: a primary config of ``conf/`` (``finetune``, ``export``, ``generate``).
        overrides: Hydra overrides (``key=value``).
        check: run ``validate`` on a ``finetune`` config.

    Returns:
        The composed ``DictConfig``, interpolations resolved.
    """
    register()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    OmegaConf.resolve(cfg)
    if check and config_name == "finetune":
        validate(cfg)
    return cfg
