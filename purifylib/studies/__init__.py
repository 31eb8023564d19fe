"""The studies: one module per notebook, each ``run(config) -> Study`` plus the tables, figures and
verdict it writes. ``grid``: the held-out attack grid (the paper's Table 2)."""
