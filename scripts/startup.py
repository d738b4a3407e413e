"""Start-up: the wall time of commands that train nothing (`train --help`, `train --cfg job`,
`evaluate --help`) beside `python -c "import torch"`, run alternately so that the machine's
noise falls on all of them alike. Prints the median of each and its ratio to importing torch.

    python scripts/startup.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = {
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    "train --help": ["train", "--help"],
    "train --cfg job": ["train", "--cfg", "job"],
    "evaluate --help": ["evaluate", "--help"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    rounds = parser.parse_args().rounds
    seconds: dict[str, list[float]] = {name: [] for name in COMMANDS}
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(rounds):
            for name, command in COMMANDS.items():
                start = time.perf_counter()
                subprocess.run(command, cwd=cwd, check=True, capture_output=True)
                seconds[name].append(time.perf_counter() - start)
    baseline = statistics.median(seconds['python -c "import torch"'])
    print(f"{'command':28} {'median s':>9} {'x import torch':>15}")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:28} {median:9.3f} {median / baseline:15.2f}")


if __name__ == "__main__":
    main()
