"""The placement study's config: its schema (``PlacementStudyConfig``, built on the product's ``model``, ``peft``,
``data`` and ``optim`` schemas), its cross-field checks (``validate_study``) and ``compose`` for tests.

The study's YAML lives in ``conf/`` beside this file; its primary config adds the product's config groups
(``pkg://nemo_mla_lora.conf``) to Hydra's search path. ``${study_file:NAME}`` in that YAML is the path of
``NAME`` in this directory (the task data in ``data/``, the GPU-size model in ``models/``).
"""

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from nemo_mla_lora.config.schema import DataConfig, ModelConfig, OptimConfig, PeftConfig
from nemo_mla_lora.config.validate import check_known_keys

HERE = Path(__file__).resolve().parent
CONF_DIR = HERE / "conf"


def study_file(name: str) -> str:
    """The path of ``name`` relative to this directory (``${study_file:data/reverse_train.jsonl}`` in the YAML).

    Args:
        name: a path relative to ``studies/placement``.

    Returns:
        The absolute path, as a string.
    """
    return str(HERE / name)


if not OmegaConf.has_resolver("study_file"):
    OmegaConf.register_new_resolver("study_file", study_file)


@dataclass
class StudyConfig:
    """The placement study's grid (``variants.py`` names the variants) and its run settings."""

    variants: list[str] = field(default_factory=list)  # MLA variants
    twin_variants: list[str] = field(default_factory=list)  # standard-attention twin variants (claim 4)
    lr_scales: list[float] = field(default_factory=lambda: [0.5, 0.8, 1.0, 2.0])  # x optim.lr
    seeds: list[int] = field(default_factory=lambda: [1, 2])
    steps: int = 60
    eval_every: int = 20
    batch_size: int = 16
    device: str = "cpu"  # cpu | cuda
    spike_factor: float = 5.0  # grad norm above factor x the median of the 20 steps before = a spike
    time_budget_s: float | None = None  # stop starting runs after this; a rerun resumes from runs.jsonl
    plots: bool = True
    shard: str = "0/1"  # "i/n": this process runs every n-th run of the grid from the i-th (GPU shards)
    base_dir: str | None = None  # where the pretrained bases are cached (default output_dir); shared by shards
    pretrain_only: str | None = None  # mla | twin: make and cache that base, then stop (one process per base)


@dataclass
class PlacementStudyConfig:
    model: ModelConfig = MISSING
    peft: PeftConfig = field(default_factory=PeftConfig)  # dim, alpha (the variants choose the targets)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    output_dir: str = "runs/placement_study"
    seed: int = 1234  # base pretraining


def validate_study(cfg) -> None:
    """The placement study's cross-field checks. Raises ValueError."""
    from studies.placement import variants

    check_known_keys(cfg)
    s, errors = cfg.study, []
    for names, arch in ((s.variants, variants.MLA), (s.twin_variants, variants.TWIN)):
        try:
            variants.lookup(names, arch)
        except ValueError as err:
            errors.append(str(err))
    if not s.variants and not s.twin_variants:
        errors.append("study.variants and study.twin_variants are both empty: nothing to run")
    if not s.lr_scales or min(s.lr_scales) <= 0:
        errors.append(f"study.lr_scales must be non-empty and positive, got {list(s.lr_scales)}")
    if not s.seeds:
        errors.append("study.seeds is empty")
    if s.steps <= cfg.optim.warmup_steps:
        errors.append(f"study.steps={s.steps} must exceed optim.warmup_steps={cfg.optim.warmup_steps}")
    if s.pretrain_only not in (None, "mla", "twin"):
        errors.append(f"study.pretrain_only={s.pretrain_only!r}; expected mla, twin or null")
    index, _, count = s.shard.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        errors.append(f"study.shard={s.shard!r}; expected 'i/n' with 0 <= i < n")
    if s.device not in ("cpu", "cuda"):
        errors.append(f"study.device={s.device!r}; expected 'cpu' or 'cuda'")
    if not cfg.data.train or not cfg.data.validation:
        errors.append("data.train and data.validation are needed (the study task and its held-out set)")
    if cfg.model.checkpoint and s.twin_variants:
        errors.append("the twin is pretrained like the MLA base; with model.checkpoint set, drop study.twin_variants")
    if not cfg.model.checkpoint and not (cfg.data.base_pretrain and cfg.data.base_pretrain_steps > 0):
        errors.append("no model.checkpoint and no data.base_pretrain (with base_pretrain_steps > 0) to make a base")
    if errors:
        raise ValueError("invalid placement study config:\n  - " + "\n  - ".join(errors))


def register() -> None:
    """Store ``placement_study_schema`` (and the product's schemas it builds on) in Hydra's ConfigStore."""
    from nemo_mla_lora.config.schema import register as register_product

    register_product()
    ConfigStore.instance().store(name="placement_study_schema", node=PlacementStudyConfig)


def compose(overrides=(), check: bool = True):
    """The composed, resolved placement study config, validated.

    Args:
        overrides: Hydra overrides (``key=value``).
        check: run ``validate_study``.

    Returns:
        The composed ``DictConfig``, interpolations resolved.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name="placement_study", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    if check:
        validate_study(cfg)
    return cfg
