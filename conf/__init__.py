"""Hydra configs, shipped inside the package as nemo_mla_lora.conf."""
