"""Named analyses built on probe; each returns a typed result of tidy per-block DataFrames.

Each analysis is a package, `analyses/NAME/`: its `__init__` holds the function (a frozen
dataclass result with `.tables()`, columns documented on it) and declares the analysis once
(`ANALYSIS`, read by `analyses.registry`); its `__main__` is the command `python -m
analyses.NAME --out DIR`, which writes the tables as CSV with PNG figures. `python -m
probe.ablate` runs every registered analysis (through `analyses.pipeline`) and puts one section
per analysis in its report. The list, with one line each: `python -c "from analyses import
registry; [print(a.name, '-', a.summary) for a in registry.registered()]"`, or docs/analyses.md.

The analyses are not imported here, so importing one does not import them all. The verdict
rule is in the core (`probe.scoring.verdict`); what may import what: docs/architecture.md.
"""
