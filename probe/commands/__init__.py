"""The command layer under `python -m probe.ablate`, `probe.train` and `analyses.NAME`: one
`RunConfig`, what a config loads, the resumable run folder, threads, the allocator, and the
runner that turns errors into one line."""
