"""What the transformer's memory options trade, on a training step: model.activation_checkpointing
(activations) and model.lora_rank (gradients and optimizer state), each against the plain model.

    python scripts/benchmark_memory.py [--depth 8] [--width 512] [--context 512] [--batch 4]
                                       [--steps 4] [--rounds 2] [--lora-rank 8] [--device cpu]
                                       [--json FILE]

Each case runs in a fresh process (so its peak memory is its own), the cases alternating for
`rounds` rounds: a language model of the given shape (vocabulary 65, tiny-shakespeare's), AdamW
over all its parameters as the trainer gives them (frozen ones get no gradient and no state),
`steps` steps after one warm-up step. Reported: the bytes autograd keeps for the backward pass
(counted by a saved-tensors hook, the weights left out: they are held anyway), those of the
gradients and AdamW's state after a step (what LoRA saves), the process's peak resident memory
above what it held with the model built (gradients, optimizer state, activations; on CUDA, torch's
peak allocation), and the median step time.
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
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.models.transformer import Transformer

VOCAB = 65


CASES = {"plain": {}, "checkpointed": {"activation_checkpointing": True},
         "lora": {"lora_rank": None}}  # None: --lora-rank


def measure(args: argparse.Namespace, case: str) -> dict[str, float]:
    """One case, in this process: kept bytes, peak memory added, median step seconds."""
    device = torch.device(args.device)
    options = {key: args.lora_rank if value is None else value
               for key, value in CASES[case].items()}
    torch.manual_seed(0)
    model = Transformer(vocab_size=VOCAB, block_size=args.context, width=args.width,
                        depth=args.depth, heads=args.width // 64, rotary=True,
                        **options).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(VOCAB, (args.batch, args.context + 1), device=device)
    kept: list[int] = []
    held: list[int] = []

    weights = {p.data_ptr() for p in model.parameters()}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.data_ptr() not in weights:  # a weight saved for backward costs nothing more
            kept.append(tensor.numel() * tensor.element_size())
        return tensor

    def step(count_kept: bool = False) -> None:
        counting = torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor)
        with counting if count_kept else contextlib.nullcontext():
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        if count_kept:  # what training holds beside the weights and activations
            held.append(_bytes(p.grad for p in model.parameters() if p.grad is not None))
            held.append(_bytes(t for state in optimizer.state.values()
                               for t in state.values() if torch.is_tensor(t)))
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    before = _resident_mb()  # the weights are held: what a step adds is measured
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
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"kept_mb": sum(kept) / 2**20, "state_mb": sum(held) / 2**20,
            "peak_added_mb": peak - before,
            "step_s": statistics.median(times), "trained_params": trained}


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


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
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the medians to this file")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # a child process: one case, its figures as JSON
        print(json.dumps(measure(args, args.case)))
        return
    shape = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in
             ("depth", "width", "context", "batch", "steps", "lora_rank", "device")]
    results: dict[str, list[dict[str, float]]] = {case: [] for case in CASES}
    for _ in range(args.rounds):
        for case in results:
            child = subprocess.run([sys.executable, __file__, *shape, f"--case={case}"],
                                   capture_output=True, text=True, check=True)
            results[case].append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"{args.depth} blocks, {args.width} wide, context {args.context}, batch {args.batch}, "
          f"{args.device}, {torch.get_num_threads()} threads; medians of {args.rounds} rounds")
    medians = {case: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
               for case, runs in results.items()}
    plain = medians["plain"]
    print(f"{'':14}{'trained':>12}{'kept for backward':>19}{'grads + AdamW':>15}"
          f"{'peak added':>12}{'step':>8}  against plain")
    for case, figures in medians.items():
        ratios = "" if case == "plain" else "  " + ", ".join(
            f"{name} {figures[key] / plain[key]:.2f}x" for name, key in
            (("kept", "kept_mb"), ("grads+state", "state_mb"), ("peak", "peak_added_mb"),
             ("step", "step_s")))
        print(f"{case:14}{figures['trained_params']:>12,.0f}{figures['kept_mb']:>16,.0f} MB"
              f"{figures['state_mb']:>12,.0f} MB{figures['peak_added_mb']:>9,.0f} MB"
              f"{figures['step_s']:>7.2f}s{ratios}")
    if args.json:
        Path(args.json).write_text(json.dumps(medians, indent=2) + "\n")


if __name__ == "__main__":
    main()
