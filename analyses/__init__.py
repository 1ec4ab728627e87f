"""Named analyses built on probe; each takes and returns tidy per-block DataFrames.

Each analysis is a package: its `__init__` holds a function returning tidy DataFrames (columns
documented on its result), its `__main__` the command `python -m analyses.NAME --out DIR` that
writes them as CSV with PNG figures. `python -m probe.ablate` runs them all (through
`analyses.pipeline`) and puts one section per analysis in its report:

    analyses.degradation    degradation(depths)             plain vs residual nets against depth
    analyses.skipping       skipping(model, data, table)    delete the skipped blocks together,
                                                            deletion curves, pruned export
    analyses.attribution    attribution(model, data, table) cheap proxies vs the measured drop
    analyses.uncertainty    uncertainty(model, data, table) bootstrap intervals, per-class drops
    analyses.representation representation(model, data,     linear probes, logit lens, refinement,
                            train_data=...)                 CKA between blocks, classes served
    analyses.recalibration  recalibration(model, data, cal) deletion cost with BN statistics refitted
    analyses.lm             lm_layers(model, data, table)   a language model's layers: block influence,
                                                            spans, greedy deletion, logit lens

The analyses are not imported here, so importing one does not import them all. The verdict
rule is in the core (`probe.scoring.verdict`); what may import what: docs/architecture.md.
"""
