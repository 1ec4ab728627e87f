"""Text as windows of token ids: `--dataset pydoc` and `--dataset text --data-root FILE`.

The convention: the text is tokenized as one stream with the tokenizer's defaults and no special
tokens added, and cut into consecutive, non-overlapping windows of `seq_len` tokens; the last,
partial window is dropped. `--limit N` keeps the first N windows (default `TEXT_WINDOWS`, 4). Each item is a `(seq_len,)`
int64 tensor of token ids (a 1-tuple: no targets; the `lm` task predicts each next token).

`pydoc`: CPython's bundled `pydoc_data.topics` (the help texts of `help("TOPIC")`), topics sorted
by key and joined by blank lines: text that ships with every Python.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydoc_data.topics import topics
from torch.utils.data import TensorDataset

from probe.errors import ProbeError

__all__ = ["TEXT_DATASETS", "TEXT_WINDOWS", "pydoc_text", "read_text", "text_windows"]

TEXT_DATASETS = ("pydoc", "text")
# Windows a run evaluates when --limit is not given (a few: every deletion costs a forward over them).
TEXT_WINDOWS = 4


def pydoc_text() -> str:
    """CPython's `pydoc_data.topics`, topics sorted by key, joined by blank lines."""
    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text(dataset: str, data_root: str | None) -> str:
    """The text `--dataset pydoc` or `--dataset text --data-root FILE` names."""
    if dataset == "pydoc":
        return pydoc_text()
    if not data_root:
        raise ProbeError("--dataset text needs --data-root FILE: a UTF-8 text file to cut into windows.")
    path = Path(data_root)
    if not path.is_file():
        raise ProbeError(f"--data-root {data_root!r} is not a file; --dataset text reads one UTF-8 text file.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ProbeError(f"--data-root {data_root!r} is not UTF-8 text ({error.reason} at byte {error.start}).") \
            from error


def text_windows(tokenizer, text: str, seq_len: int) -> TensorDataset:
    """Consecutive non-overlapping windows of `seq_len` token ids (the last partial one dropped)."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise ProbeError(f"--seq-len must be a whole number >= 2 (a window predicts its next tokens), got {seq_len!r}.")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = len(ids) // seq_len
    if windows == 0:
        raise ProbeError(f"the text has {len(ids)} tokens: fewer than one window of --seq-len {seq_len}; "
                         "give more text or a smaller --seq-len.")
    tokens = torch.tensor(ids[:windows * seq_len], dtype=torch.long).view(windows, seq_len)
    return TensorDataset(tokens)
