"""How a forward is instrumented: hooks that leave no trace, additions caught at run time,
captured graphs replayed, and `measure` (branch vs shortcut statistics reduced in the hooks)."""
