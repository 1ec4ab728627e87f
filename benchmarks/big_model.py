"""Peak memory and time per deletion of one Llama-architecture model loaded three ways: float32
weights, bfloat16 weights (`--dtype bf16`), and bfloat16 with half its layers on disk
(`--device-map FILE --offload-folder DIR`: the second half of the layers, read back for each forward).

    python benchmarks/big_model.py                      # a small config, on the CPU
    python benchmarks/big_model.py --size 1b --device cuda   # 1.1B parameters (TinyLlama's shape)

The model is built from a config with random weights (no hub) and saved once in bfloat16 to a
temporary folder; each way then loads it in a fresh process (peak memory only grows within a
process) as `--model hf:PATH` does, and sweeps every block (`probe.sweep`, task lm) over the same
random token windows. Printed per way: the load time, the sweep's time per deletion, the
weights held in memory, the peak resident memory above what the process held before loading
(and on cuda the peak GPU memory torch allocated), the baseline loss; then the ratios against
float32 and the largest difference of the swept losses. bf16 should take about half float32's
memory; the disk way holds half bf16's weights, with a slower deletion (on the
CPU its peak RSS also counts the offloaded files' pages it reads); both losses within bf16
rounding of float32's, and the disk way's equal to bf16's.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Llama shapes: hidden, intermediate, layers, attention heads, key-value heads, vocabulary.
SIZES = {"small": (512, 1376, 8, 8, 4, 8192), "1b": (2048, 5632, 22, 32, 4, 32000)}
WAYS = ("fp32", "bf16", "bf16+disk")


def config(size: str):
    import transformers

    hidden, intermediate, layers, heads, kv_heads, vocab = SIZES[size]
    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                    num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                    max_position_embeddings=2048, tie_word_embeddings=False)


def build(size: str, folder: Path) -> None:
    """The random model, made and saved in bfloat16 (no float32 copy of a 1B model is needed)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config(size), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{parameters / 1e6:.0f}M parameters, {config(size).num_hidden_layers} layers")


def child(size: str, way: str, folder: Path, device: str, windows: int, seq_len: int, threads: int) -> None:
    import torch

    import probe
    from probe.loading.huggingface import load_hf_model

    torch.set_num_threads(threads)
    layers = config(size).num_hidden_layers
    options: dict = {"dtype": torch.float32 if way == "fp32" else torch.bfloat16}
    if way.endswith("+disk"):
        here = 0 if device == "cuda" else "cpu"
        device_map = {"model.embed_tokens": here, "model.rotary_emb": here, "model.norm": here, "lm_head": here,
                      **{f"model.layers.{i}": here if i < layers // 2 else "disk" for i in range(layers)}}
        options.update(device_map=device_map, offload_folder=tempfile.mkdtemp(prefix="probe-offload-"))
    before = _resident_mib()  # the interpreter, torch and transformers: counted apart
    start = time.perf_counter()
    model = load_hf_model(f"hf:{folder}", torch.device(device), **options)
    loaded = time.perf_counter() - start
    # What the model holds in memory (weights on disk wait on the meta device): RSS also counts
    # the pages of the files the offloaded weights are read from, which the kernel may drop.
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if not t.is_meta)
    ids = torch.randint(0, config(size).vocab_size, (windows, seq_len), generator=torch.Generator().manual_seed(1))
    data = [ids]
    blocks = probe.find_blocks(model, example_input=ids[:1].to(device))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    table = probe.sweep(model, data, task="lm", blocks=blocks, progress=False)
    swept = time.perf_counter() - start
    print(json.dumps({"load_s": loaded, "weights_mib": held / 2**20, "per_deletion_s": swept / len(blocks),
                      "deletions": len(blocks),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before,
                      "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
                      "engine": probe.fast_path_note(model).engine, "baseline": table.attrs["baseline"]["loss"],
                      "losses": table["loss"].tolist()}))


def _resident_mib() -> float:
    """This process's resident memory now (Linux), in MiB."""
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=sorted(SIZES),
                        help="small (default, for a CPU) or 1b (1.1B parameters, for a GPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=4, help="token windows per forward (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("WAY", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.size, args.child[0], Path(args.child[1]), args.device, args.windows, args.seq_len, args.threads)
        return
    with tempfile.TemporaryDirectory(prefix="probe-big-model-") as folder:
        build(args.size, Path(folder))
        results = {}
        for way in WAYS:
            command = [sys.executable, __file__, "--size", args.size, "--device", args.device, "--windows",
                       str(args.windows), "--seq-len", str(args.seq_len), "--threads", str(args.threads),
                       "--child", way, folder]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                sys.exit(f"{way} failed:\n{done.stderr[-3000:]}")
            results[way] = result = json.loads(done.stdout.strip().splitlines()[-1])
            gpu = f", peak GPU {result['peak_gpu_mib']:.0f} MiB" if result["peak_gpu_mib"] is not None else ""
            per_deletion = result["per_deletion_s"] * 1e3
            print(f"big model {args.size} {way:9s}: load {result['load_s']:.1f} s, {per_deletion:.0f} ms "
                  f"per deletion ({result['deletions']}, {result['engine']} engine), weights in memory "
                  f"{result['weights_mib']:.0f} MiB, peak RSS +"
                  f"{result['peak_rss_mib']:.0f} MiB{gpu}, baseline loss {result['baseline']:.4f}")
    fp32 = results["fp32"]
    memory = "peak_gpu_mib" if args.device == "cuda" else "peak_rss_mib"
    for way in WAYS[1:]:
        got = results[way]
        difference = max(abs(a - b) for a, b in zip(got["losses"], fp32["losses"]))
        print(f"big model {args.size} {way}: ratio weights in memory / fp32's: "
              f"{got['weights_mib'] / fp32['weights_mib']:.2f}, ratio peak memory / fp32's: "
              f"{got[memory] / fp32[memory]:.2f}, "
              f"ratio time per deletion / fp32's: {got['per_deletion_s'] / fp32['per_deletion_s']:.2f}, "
              f"largest loss difference from fp32: {difference:.2g}")
    same = max(abs(a - b) for a, b in zip(results["bf16"]["losses"], results["bf16+disk"]["losses"]))
    print(f"big model {args.size}: largest loss difference, layers on disk against in memory (both bf16): {same:.2g}")


if __name__ == "__main__":
    main()
