"""Merge, absorb and export: pure functions over tensors and state dicts, and the writers around them."""
