"""What model.activation_checkpointing=true trades: the memory a transformer's training step
keeps for its backward pass, against the step's time, with and without recomputing the blocks.

    python scripts/benchmark_checkpointing.py [--depth 8] [--width 512] [--context 512]
                                               [--batch 4] [--steps 4] [--rounds 2]
                                               [--device cpu] [--json FILE]

Each case runs in a fresh process (so its peak memory is its own), the cases alternating for
`rounds` rounds: a language model of the given shape (vocabulary 65, tiny-shakespeare's), AdamW,
`steps` steps after one warm-up step. Reported: the bytes autograd keeps for the backward pass
(counted by a saved-tensors hook), the process's peak resident memory above what it held before
the first step (on CUDA, torch's peak allocation), and the median step time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.models.transformer import Transformer

VOCAB = 65


def measure(args: argparse.Namespace, checkpointing: bool) -> dict[str, float]:
    """One case, in this process: kept bytes, peak memory added, median step seconds."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Transformer(vocab_size=VOCAB, block_size=args.context, width=args.width,
                        depth=args.depth, heads=args.width // 64, rotary=True,
                        activation_checkpointing=checkpointing).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(VOCAB, (args.batch, args.context + 1), device=device)
    kept: list[int] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    def step(count_kept: bool = False) -> None:
        counting = torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor)
        with counting if count_kept else contextlib.nullcontext():
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    before = _resident_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    step(count_kept=True)  # the warm-up step
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_mb()
    return {"kept_mb": sum(kept) / 2**20, "peak_added_mb": peak - before,
            "step_s": statistics.median(times)}


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the medians to this file")
    parser.add_argument("--case", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # a child process: one case, its figures as JSON
        print(json.dumps(measure(args, args.case == "checkpointed")))
        return
    shape = [f"--{key}={getattr(args, key)}" for key in
             ("depth", "width", "context", "batch", "steps", "device")]
    results: dict[str, list[dict[str, float]]] = {"plain": [], "checkpointed": []}
    for _ in range(args.rounds):
        for case in results:
            child = subprocess.run([sys.executable, __file__, *shape, f"--case={case}"],
                                   capture_output=True, text=True, check=True)
            results[case].append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"{args.depth} blocks, {args.width} wide, context {args.context}, batch {args.batch}, "
          f"{args.device}, {torch.get_num_threads()} threads; medians of {args.rounds} rounds")
    medians = {case: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
               for case, runs in results.items()}
    plain, checkpointed = medians["plain"], medians["checkpointed"]
    print(f"{'':14}{'kept for backward':>19}{'peak memory added':>19}{'step':>9}")
    for case, figures in medians.items():
        print(f"{case:14}{figures['kept_mb']:>16,.0f} MB{figures['peak_added_mb']:>16,.0f} MB"
              f"{figures['step_s']:>8.2f}s")
    print(f"checkpointed / plain: kept {checkpointed['kept_mb'] / plain['kept_mb']:.2f}x, "
          f"peak {checkpointed['peak_added_mb'] / plain['peak_added_mb']:.2f}x, "
          f"step time {checkpointed['step_s'] / plain['step_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(medians, indent=2) + "\n")


if __name__ == "__main__":
    main()
