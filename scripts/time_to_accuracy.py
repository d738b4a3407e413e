"""Time-to-accuracy for the tuned presets on real data, as a user would run them.

    python scripts/time_to_accuracy.py [--shared ../shared/data] [--only cnn_mnist]

Copies the offline MNIST files into ./data/MNIST/raw (git-ignored), runs each preset through the
real `train` command, and prints its metric, target and wall time. Exits 1 if a target is missed.
Run it alone: another torch process on the same cores distorts the times.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (overrides, metric, target, higher is better)
PRESETS = {
    "cnn_mnist": (["experiment=cnn_mnist", "data.root=data", "data.download=false"],
                  "test/acc", 0.99, True),
    "baby_gpt": (["experiment=baby_gpt", "data.path={shared}/tinyshakespeare.txt"],
                 "val/loss", 1.9, False),
}


def newest_run(outputs: Path) -> Path:
    return max((p.parent for p in outputs.glob("*/*/.hydra")), key=lambda p: p.stat().st_mtime)


def best_val_loss(run: Path) -> float:
    import torch

    return torch.load(run / "checkpoints" / "best.pt", weights_only=True)["metrics"]["val/loss"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--only", choices=sorted(PRESETS))
    args = parser.parse_args()
    raw = ROOT / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in (args.shared / "mnist").glob("*.gz"):
        shutil.copy(gz, raw / gz.name)

    failed = False
    print(f"{'preset':<10} {'metric':<9} {'value':>7} {'target':>7} {'seconds':>8}")
    for name, (overrides, metric, target, higher) in PRESETS.items():
        if args.only and name != args.only:
            continue
        command = ["train", "trainer.progress=false",
                   *(o.format(shared=args.shared) for o in overrides)]
        start = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode:
            print(f"{name}: failed\n{result.stderr[-2000:]}")
            failed = True
            continue
        run = newest_run(ROOT / "outputs")
        metrics = json.loads((run / "metrics.json").read_text())
        value = metrics[metric] if metric in metrics else best_val_loss(run)
        ok = value >= target if higher else value <= target
        failed |= not ok
        print(f"{name:<10} {metric:<9} {value:>7.4f} {target:>7} {seconds:>8.0f}"
              f"{'' if ok else '  MISSED'}")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
