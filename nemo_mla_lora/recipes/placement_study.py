"""Moved: the placement study is no longer part of the package. Run it from the repository root as
``python -m studies.placement [overrides]`` (studies/placement/README.md). This entry point only says so
(kept for one release, for scripts that still call it)."""

import sys

MOVED = (
    "nemo_mla_lora.recipes.placement_study has moved out of the package: from the repository root run "
    "`python -m studies.placement [overrides]` (the same overrides; studies/placement/README.md)"
)

if __name__ == "__main__":
    sys.exit(MOVED)
