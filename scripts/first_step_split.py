"""Where the time to a cached text run's first step goes: `train model=transformer data=text
data.path=FILE` from the command's start to the end of its first step, then the same work in a
fresh process timed piece by piece (imports, config, opening the token cache, building the model,
the first batch and step).

    python scripts/first_step_split.py [--size-mb 200] [--file FILE] [--rounds 3]

The corpus is generated as benchmark_text.py makes it (tiny-shakespeare repeated) unless --file
names one; its token cache is built once first, so every measured run finds it. Target on a 2-core
machine: the first step within 5 s of the command's start. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from benchmark_text import SOURCE, generate  # noqa: E402
from first_step import until_step  # noqa: E402

# Run in a fresh process: each mark is seconds since the interpreter started its own code.
PIECES = """
import json, sys, time
start = time.perf_counter()
marks = {}
import torch
from hydra import compose, initialize_config_dir
from trainer.cli import CONFIG_DIR
from trainer.config import validate
from trainer.data import train_batches
from trainer.distributed import runtime
from trainer.run.loop import Setup, build_model, prepare
from trainer.run.step import train_step
from trainer.targets import instantiate
marks["imports"] = time.perf_counter() - start
with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
    cfg = compose("train", overrides=["model=transformer", "data=text", "data.path=" + sys.argv[1],
                                      "logger=none"])
validate(cfg)
rt = runtime(cfg.device)
marks["config"] = time.perf_counter() - start - sum(marks.values())
data = instantiate(cfg.data, seed=cfg.seed)
marks["token cache opened"] = time.perf_counter() - start - sum(marks.values())
task, model = build_model(cfg, data.spec, rt)
run = prepare(Setup(cfg, rt, data.to(rt.device), task, model), None)
marks["model and optimizer built"] = time.perf_counter() - start - sum(marks.values())
order = train_batches(len(data.train), data.batch_size, cfg.seed, 0, 0, 1)
batch = next(data.train.stream(order, 0))
train_step(task, run.step_model, run.optimizers, run.scaler, [batch], rt, 1.0)
marks["first batch and step"] = time.perf_counter() - start - sum(marks.values())
print(json.dumps(marks))
"""


def pieces(path: Path) -> dict[str, float]:
    """The split, in a fresh process, with the interpreter's own start-up as a first piece."""
    begun = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PIECES, str(path)], capture_output=True,
                          text=True, check=True)
    marks = json.loads(done.stdout.strip().splitlines()[-1])
    return {"python start and exit": time.perf_counter() - begun - sum(marks.values()), **marks}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--file", type=Path, help="a text file instead of the generated corpus")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or Path(tmp) / "corpus.txt"
        if not args.file:
            generate(SOURCE, path, args.size_mb)
        until_step(["model=transformer", "data=text", f"data.path={path}"], Path(tmp), 1)
        command, splits = [], []
        for _ in range(args.rounds):  # alternating, so drift falls on both alike
            command.append(until_step(["model=transformer", "data=text", f"data.path={path}"],
                                      Path(tmp), 1)[0])
            splits.append(pieces(path))
        size_mb = path.stat().st_size / 1e6
    print(f"train model=transformer data=text ({size_mb:.0f} MB, cache in "
          f"place): first step after {statistics.median(command):.2f} s (median of "
          f"{args.rounds}; {', '.join(f'{s:.2f}' for s in command)})")
    print("the same work in one process, piece by piece (medians):")
    for key in splits[0]:
        print(f"  {key:28} {statistics.median(s[key] for s in splits):6.2f} s")


if __name__ == "__main__":
    main()
