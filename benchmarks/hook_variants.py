"""Where measure's hook cost goes on a GPU, and what two ways of cutting it would buy.

    python benchmarks/hook_variants.py --device cuda [--data synthetic ...]

Times, over the same batches: the plain eager forward; `probe.measure` as it is; measure with the
three reductions done other ways (no copies; fused into one compiled kernel, first call apart);
and the instrumented forward replayed from a CUDA graph (one graph per batch shape), next to the
plain forward replayed from a graph. Checks that every variant gives measure's numbers.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import probe  # noqa: E402
from common import (autocast, best_times, default_setup, describe, paired_ratio, parser,  # noqa: E402
                    plain_inference, timed_rounds)
from probe.instrument import measurement as measure_module  # noqa: E402
from probe.instrument.hooks import tap_pairs  # noqa: E402

COLUMNS = ["branch_norm", "shortcut_norm", "ratio", "cosine"]


flat_pair = measure_module._flat_pair  # the library's own: views in memory order


def norms(f: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # An explicit dtype: accumulated in fp32 with no upcast copy, and autocast leaves it alone.
    return (torch.linalg.vector_norm(f, dim=1, dtype=torch.float32),
            torch.linalg.vector_norm(s, dim=1, dtype=torch.float32))


def previous(branch, shortcut):
    f = branch.reshape(len(branch), -1).float()
    s = shortcut.reshape(len(shortcut), -1).float()
    return torch.linalg.vector_norm(f, dim=1), torch.linalg.vector_norm(s, dim=1), torch.linalg.vecdot(f, s, dim=1)


def no_copy_mul_sum(branch, shortcut):
    f, s = flat_pair(branch, shortcut)
    return (*norms(f, s), (f * s).sum(dim=1, dtype=torch.float32))


def no_copy_bmm(branch, shortcut):
    f, s = flat_pair(branch, shortcut)
    return (*norms(f, s), torch.bmm(f.unsqueeze(1), s.unsqueeze(2)).view(-1).float())


def fused_source(branch, shortcut):
    f = branch.reshape(len(branch), -1).float()
    s = shortcut.reshape(len(shortcut), -1).float()
    return (f * f).sum(dim=1).sqrt(), (s * s).sum(dim=1).sqrt(), (f * s).sum(dim=1)


def with_reductions(parts, function):
    """`function`, run with measure's per-block reductions computed by `parts` instead."""

    def run():
        original = measure_module._reduction_parts
        measure_module._reduction_parts = parts
        try:
            return function()
        finally:
            measure_module._reduction_parts = original

    return run


def relative(table, reference) -> float:
    a, b = table[COLUMNS].to_numpy(dtype=float), reference[COLUMNS].to_numpy(dtype=float)
    return float((abs(a - b) / (abs(b) + 1e-6)).max())


def graphed(model, data, instrumented: bool):
    """One CUDA graph per batch shape of the (instrumented) forward, and a function that replays
    them over `data`, returning each batch's per-block sums of the quantities when instrumented."""
    blocks = probe.find_blocks(model)
    seen: dict[int, torch.Tensor] = {}
    rows = {block.name: row for row, block in enumerate(blocks)}
    handles: list = []
    if instrumented:
        tap_pairs(model, blocks, lambda b, f, s: seen.__setitem__(rows[b.name], measure_module._reductions(f, s)),
                  handles)
    graphs = {}
    with torch.no_grad():
        for inputs, _ in data:
            if inputs.shape in graphs:
                continue
            static = inputs.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    model(static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(static)
                outputs = torch.stack([seen[r] for r in sorted(seen)]) if instrumented else None
            graphs[inputs.shape] = (graph, static, outputs)
    for handle in handles:
        handle.remove()

    def replay():
        results = []
        for inputs, _ in data:
            graph, static, outputs = graphs[inputs.shape]
            static.copy_(inputs)
            graph.replay()
            if outputs is not None:
                results.append(measure_module._quantities(outputs).sum(dim=1))
        return results

    return replay


def main() -> None:
    args = parser(__doc__).parse_args()
    args.repeats = max(args.repeats, 5)
    model, data = default_setup(args)
    blocks = probe.find_blocks(model)

    plain = plain_inference(model, data, args)

    def measured():
        with autocast(args):
            return probe.measure(model, data, progress=False)

    print("hook variants: " + describe(args, len(blocks), data))
    reference = measured()
    variants = {"eager of the previous release (copies)": previous,
                "no-copy flatten, norms with dtype, (F*s).sum": no_copy_mul_sum,
                "no-copy flatten, norms with dtype, bmm": no_copy_bmm,
                "fused, torch.compile(dynamic)": torch.compile(fused_source, dynamic=True)}
    runs, notes = {}, {}
    for label, parts in variants.items():
        run = with_reductions(parts, measured)
        try:
            start = time.perf_counter()
            result = run()  # the first call, compiling included, is timed apart
            notes[label] = (f"first call {time.perf_counter() - start:.1f} s; "
                            f"largest relative difference {relative(result, reference):.1e}")
            runs[label] = run
        except Exception as error:  # a variant that fails is a finding, not the end of the run
            print(f"  measure, {label}: failed: {type(error).__name__}: {str(error)[:300]}")
    # Everything takes turns in every round, as in the other benchmarks.
    # Ratios: medians of the rounds' ratios to the plain forward (see common.paired_ratio).
    plain_s, measure_s, *variant_s = timed_rounds([plain, measured, *runs.values()], args.repeats, args.device)
    print(f"  plain eager forward:             {min(plain_s):.4f} s")
    print(f"  probe.measure (eager hooks):     {min(measure_s):.4f} s   ratio {paired_ratio(measure_s, plain_s):.3f}")
    for label, seconds in zip(runs, variant_s):
        print(f"  measure, {label:45s} {min(seconds):.4f} s   ratio {paired_ratio(seconds, plain_s):.3f}   "
              f"({notes[label]})")

    if args.device.startswith("cuda"):
        try:
            with autocast(args):
                plain_graph = graphed(model, data, instrumented=False)
                measure_graph = graphed(model, data, instrumented=True)
            plain_graph_s, measure_graph_s = best_times([plain_graph, measure_graph], args.repeats, args.device)
            total = sum(measure_graph())
            expected = torch.tensor(reference["ratio"].to_numpy())
            mean_ratio = (total[:, 2] / sum(len(y) for _, y in data)).cpu()
            difference = (mean_ratio - expected).abs().max().item()
            print(f"  plain forward, CUDA graph:       {plain_graph_s:.4f} s   ratio {plain_graph_s / plain_s:.3f}")
            print(f"  measure forward, CUDA graph:     {measure_graph_s:.4f} s   ratio {measure_graph_s / plain_s:.3f}"
                  f"   (vs graphed plain {measure_graph_s / plain_graph_s:.3f}; ratio column off by {difference:.1e})")
        except Exception as error:
            print(f"  CUDA graphs: failed: {type(error).__name__}: {str(error)[:300]}")


if __name__ == "__main__":
    main()
