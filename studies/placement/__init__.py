"""The placement study: variants, one run, stability metrics, tables, claims and plots."""
