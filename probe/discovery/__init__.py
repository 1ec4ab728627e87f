"""Where blocks are found: the `Block` record, what counts as a residual addition, a forward
recorded as a graph, `find_blocks`, blocks named by the user, and decoder layers."""
