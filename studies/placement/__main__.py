"""``python -m studies.placement [overrides]``: the placement study (``run.main``; README.md beside this file)."""

from studies.placement.run import main

main()
