"""Typed Hydra config schemas (registered in Hydra's ConfigStore) and their cross-field checks."""
