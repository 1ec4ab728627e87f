"""Named analyses built on probe; each takes and returns tidy per-block DataFrames.

Each analysis is a module with a function returning tidy DataFrames (columns documented on its
result) and a command, `python -m analyses.NAME --out DIR`, that writes them as CSV with PNG
figures; `python -m probe.ablate` runs them all and puts one section per analysis in its report:

    analyses.degradation    degradation(depths)             plain vs residual nets against depth
    analyses.skipping       skipping(model, data, table)    delete the skipped blocks together,
                                                            deletion curves, pruned export
    analyses.attribution    attribution(model, data, table) cheap proxies vs the measured drop
    analyses.uncertainty    uncertainty(model, data, table) bootstrap intervals, per-class drops
    analyses.recalibration  recalibration(model, data, cal) deletion cost with BN statistics refitted
    analyses.verdict        classify, summarize, ...        the verdict rule (re-exported here)

The analysis modules are not imported here: they pull in torch, and the verdict rule does not.
"""

from analyses.verdict import (
    VERDICTS,
    VerdictRule,
    classify,
    noise_band,
    rank_correlation,
    summarize,
)

__all__ = [
    "VERDICTS",
    "VerdictRule",
    "classify",
    "noise_band",
    "rank_correlation",
    "summarize",
]
