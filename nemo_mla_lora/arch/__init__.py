"""The model description: what an MLA model is, independent of any file or framework object.

``mla_spec`` (``MLASpec``: every dimension and field that changes the numbers), ``hf_config`` (HF ``config.json``
<-> ``MLASpec``, strict), ``keymap`` (Megatron <-> HF tensor names, TE-spec names) and ``absorb`` (the per-head
split of ``linear_kv_up_proj`` that absorbed attention uses). Imports nothing else of this package.
"""
