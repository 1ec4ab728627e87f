"""Scoring: what a forward's outputs mean (tasks), per-sample scores summed into outcomes, the
typed results, the verdict rule, and the cost vocabulary every table and report reads."""
