"""`--batch-size auto`: tensor memory counted exactly, the windows chosen from a budget by hand,
the engine's real peak within the budget, and the command's record, table and resume."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from probe import find_blocks
from probe.ablate import main
from probe.commands import batch_size
from probe.commands.batch_size import choose_batch_size, memory_budget
from probe.commands.byte_sizes import parse_size
from probe.commands.config import RunConfig
from probe.deletion.evaluation import evaluate_ablations
from probe.errors import ProbeError
from probe.instrument.memory import TensorMemory
from probe.scoring.tasks import LanguageModeling
from tiny_models import assert_unchanged, snapshot, tiny_llama

transformers = pytest.importorskip("transformers")

WINDOWS, LENGTH = 16, 8


def test_tensor_memory_counts_new_storage_until_it_is_freed():
    x, weight = torch.randn(4, 8), torch.randn(8, 16)  # made before: not counted
    with torch.no_grad(), TensorMemory() as memory:
        y = x @ weight  # 4 x 16 floats: 256 bytes
        z = torch.relu(y)  # 256 more: 512 live
        z.view(-1).add_(1)  # a view and an in-place call make no storage
        after_view = memory.live
        del y  # 256 freed
        freed = memory.live
        w = z * 2  # 256 again: back to 512, never above
    assert (after_view, freed, memory.live, memory.peak) == (512, 256, 512, 512)
    assert w.shape == (4, 16)


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama(3)
    ids = torch.randint(0, 50, (WINDOWS, LENGTH), generator=torch.Generator().manual_seed(1))
    return model, ids, find_blocks(model, example_input={"input_ids": ids[:1]})


def _choose(model, ids, blocks, budget: int, available: int = WINDOWS, earlier: int | None = None):
    return choose_batch_size(model, lambda n: [{"input_ids": ids[:n]}], task=LanguageModeling(), blocks=blocks,
                             available=available, budget=(budget, "a test's"), earlier=earlier)


def test_the_choice_is_the_most_windows_the_budget_holds(llama):
    model, ids, blocks = llama
    before = snapshot(model)
    measured = _choose(model, ids, blocks, 10**9)
    assert_unchanged(model, before)
    # One set of layer outputs per window: 3 layers x 8 positions x 16 floats of 4 bytes.
    assert measured.cache_bytes == 3 * LENGTH * 16 * 4
    # A window holds at least its logits twice (the logits, their log-softmax): 8 x 50 floats each.
    assert measured.window_bytes >= 2 * LENGTH * 50 * 4 + measured.cache_bytes
    fixed, window = measured.fixed_bytes, measured.window_bytes
    for fits in (1, 2, 3, 5, 11):
        choice = _choose(model, ids, blocks, fixed + fits * window)
        assert (choice.fits, choice.windows, choice.kept) == (fits, fits, False)
        if fits > 1:
            assert _choose(model, ids, blocks, fixed + fits * window - 1).windows == fits - 1
    assert _choose(model, ids, blocks, fixed + 8 * window, available=5).windows == 5  # no more than there are
    # An earlier run's size is kept while it fits, else the most that fit now.
    assert _choose(model, ids, blocks, fixed + 8 * window, earlier=6).windows == 6
    assert _choose(model, ids, blocks, fixed + 5 * window, earlier=6).windows == 5
    with pytest.raises(ProbeError, match=r"one window needs .* and the budget is .*--memory-budget"):
        _choose(model, ids, blocks, fixed + window - 1)


@pytest.mark.parametrize("fits", [2, 5, 9])
def test_the_engine_stays_in_the_budget_with_the_chosen_windows(llama, fits):
    """The sweep of every block and a deletion curve, batch by batch with the chosen windows,
    counted by TensorMemory: never above the budget."""
    model, ids, blocks = llama
    measured = _choose(model, ids, blocks, 10**9)
    budget = measured.fixed_bytes + fits * measured.window_bytes
    windows = _choose(model, ids, blocks, budget).windows
    data = [{"input_ids": ids[i:i + windows]} for i in range(0, WINDOWS, windows)]
    with TensorMemory() as memory:
        evaluate_ablations(model, data, [[block] for block in blocks], task="lm", outcomes=True, progress=False)
        evaluate_ablations(model, data, [blocks[:k] for k in range(1, len(blocks))], task="lm", outcomes=True,
                           progress=False)
    assert memory.peak <= budget


def test_the_budget_is_stated_or_half_the_available_memory(monkeypatch, llama):
    model = llama[0]
    assert memory_budget(model, torch.device("cpu"), "1.5GiB") == (3 * 2**29, "--memory-budget 1.5GiB")
    monkeypatch.setattr(batch_size, "_available_memory", lambda: 10 * 2**30)
    assert memory_budget(model, torch.device("cpu")) == (5 * 2**30, "half of the 10.0 GiB this machine has available")
    assert parse_size("512MB") == 512 * 10**6 and parse_size("2e9") == 2 * 10**9
    for bad in ("lots", "-1GiB", "5XB", "0"):
        with pytest.raises(ProbeError, match=r"--memory-budget .* is not a size; give .* 8GiB"):
            parse_size(bad)


def test_options_are_checked():
    with pytest.raises(ProbeError, match=r"--batch-size auto fits a language model's .* the task is 'classification'"):
        RunConfig(batch_size="auto")
    with pytest.raises(ProbeError, match=r"--memory-budget is the memory --batch-size auto fills"):
        RunConfig(model="hf:x", memory_budget="1GiB")
    with pytest.raises(ProbeError, match=r"--memory-budget '12XB' is not a size"):
        RunConfig(model="hf:x", batch_size="auto", memory_budget="12XB")
    with pytest.raises(ProbeError, match=r"--batch-size must be a positive integer or auto, got 'many'"):
        RunConfig(model="hf:x", batch_size="many")
    assert main(["--model", "resnet20", "--batch-size", "auto", "--out", "unused"]) == 2


def test_the_command_records_the_size_it_chose_and_gives_that_sizes_table(tmp_path, capsys):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=3,
        vocab_size=50, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None))
    model.save_pretrained(tmp_path / "model")
    common = ["--model", f"hf:{tmp_path / 'model'}", "--dataset", "tiny_models:token_windows", "--task", "lm",
              "--sections", "lm", "--spans", "1", "--greedy-steps", "1", "--no-progress"]
    # A budget for 3 windows of the 5.
    assert main([*common, "--batch-size", "auto", "--memory-budget", "1GiB", "--out", str(tmp_path / "probe")]) == 0
    probe_record = json.loads((tmp_path / "probe" / "run.json").read_text())["batch_size_auto"]
    budget = probe_record["fixed_bytes"] + 3 * probe_record["window_bytes"]
    assert main([*common, "--batch-size", "auto", "--memory-budget", str(budget), "--out", str(tmp_path / "auto")]) == 0
    assert "--batch-size auto: 3 windows per forward (the most that fit)" in capsys.readouterr().err
    record = json.loads((tmp_path / "auto" / "run.json").read_text())
    assert record["batch_size"] == 3
    assert {k: record["batch_size_auto"][k] for k in ("windows", "fits", "available", "budget_bytes")} == {
        "windows": 3, "fits": 3, "available": 5, "budget_bytes": budget}
    assert main([*common, "--batch-size", "3", "--out", str(tmp_path / "three")]) == 0
    for name in ("blocks.csv", "lm_layers.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "auto" / name), pd.read_csv(tmp_path / "three" / name))
    # Rerun with more memory free: the folder's size is kept (it still fits) and the run resumes,
    # its measured and swept pieces read, not written again.
    pieces = {path: path.stat().st_mtime_ns for path in (tmp_path / "auto" / "partial").iterdir()}
    more = str(budget + probe_record["window_bytes"])
    assert main([*common, "--batch-size", "auto", "--memory-budget", more, "--out", str(tmp_path / "auto")]) == 0
    assert "3 windows per forward (as the run this folder holds chose)" in capsys.readouterr().err
    assert pieces and {path: path.stat().st_mtime_ns for path in pieces} == pieces
