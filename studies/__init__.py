"""Studies run on this package, kept outside the importable product: ``python -m studies.<name>`` from the
repository root."""
