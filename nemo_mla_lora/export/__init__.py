"""The export pipeline: merge the adapters into the base unit by unit, write a format (``mcore``, ``nemo``,
``absorbed``, ``hf``, ``hf_peft``), verify it against the unmerged model, and record ``manifest.json``."""
