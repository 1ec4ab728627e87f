"""Example models to probe: small, seeded, built to show a kind of network (not trained)."""
