"""Time-to-accuracy for the tuned presets on real data, as a user would run them.

    python scripts/time_to_accuracy.py [--shared ../shared/data] [--only cnn_mnist]
        [--fashion /usr/share/datasets/fashion-mnist] [KEY=VALUE ...]

Copies the offline MNIST and Fashion-MNIST files into ./data/*/raw (git-ignored), runs each
preset through the real `train` command (with any KEY=VALUE overrides given, such as
device.precision=32 to time a CPU without bf16 instructions), and prints its metric, target and
wall time. Exits 1 if a target (or a time limit) is missed. Run it alone: another torch process
on the same cores distorts the times.
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

LOCAL = ["data.root=data", "data.download=false"]
# name: (overrides, metric, target, higher is better, seconds allowed or None); issue #8's targets
PRESETS = {
    "cnn_mnist": (["experiment=cnn_mnist", *LOCAL], "test/acc", 0.99, True, None),
    "resnet_mnist": (["experiment=resnet_mnist", *LOCAL], "test/acc", 0.995, True, 900),
    "resnet_fashion_mnist": (["experiment=resnet_fashion_mnist", *LOCAL], "test/acc", 0.94, True,
                             900),
    "baby_gpt": (["experiment=baby_gpt", "data.path={shared}/tinyshakespeare.txt"],
                 "val/loss", 1.85, False, None),
}


def newest_run(outputs: Path) -> Path:
    return max((p.parent for p in outputs.glob("*/*/.hydra")), key=lambda p: p.stat().st_mtime)


def best_val_loss(run: Path) -> float:
    import torch

    return torch.load(run / "checkpoints" / "best.pt", weights_only=True)["metrics"]["val/loss"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--fashion", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--only", choices=sorted(PRESETS))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    for source, folder in ((args.shared / "mnist", "MNIST"), (args.fashion, "FashionMNIST")):
        raw = ROOT / "data" / folder / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for gz in source.glob("*.gz"):
            shutil.copy(gz, raw / gz.name)

    failed = False
    print(f"{'preset':<20} {'metric':<9} {'value':>7} {'target':>7} {'seconds':>8}")
    for name, (overrides, metric, target, higher, allowed) in PRESETS.items():
        if args.only and name != args.only:
            continue
        command = ["train", "trainer.progress=false",
                   *(o.format(shared=args.shared) for o in overrides), *args.overrides]
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
        ok = (value >= target if higher else value <= target) and seconds <= (allowed or seconds)
        failed |= not ok
        print(f"{name:<20} {metric:<9} {value:>7.4f} {target:>7} {seconds:>8.0f}"
              f"{'' if ok else '  MISSED'}")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
