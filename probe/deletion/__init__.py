"""How blocks are deleted and what it costs: the `ablated` context manager, the evaluation
engines with their two fast paths (compiled suffixes, layer replay), BatchNorm recalibration,
the per-block table, surgery (a pruned copy saved and read back), and a job's store of outcomes
(each set of blocks evaluated once)."""
