"""Time the text data path on a generated corpus: first run (tokenize into the cache), second run
(memory-map the cache), for the char and bpe tokenizers, each in a fresh process so its peak
memory (ru_maxrss) is its own.

    python scripts/benchmark_text.py [--size-mb 200] [--vocab-size 512] [--skip-bpe]

The corpus is tiny-shakespeare (../shared/data, or any file given with --source) repeated, with
non-ASCII lines mixed in so the UTF-8 path is exercised. Targets on a 2-core machine: char first
run >= 50 MB/s under 2 GB peak; a cache hit well under 5 s, and the `train` command's first step
within 5 s of its start; bpe training + encoding < 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from first_step import until_step  # noqa: E402

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
EXTRA = "Ça va? Über die Straße — naïve café, 東京の夜 ✓ 😀 Ελληνικά\n"


def generate(source: Path, target: Path, size_mb: int) -> None:
    """Write `size_mb` MB of `source` repeated, a few non-ASCII lines after every 1,000 lines."""
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    block = "".join(line + (EXTRA if i % 1000 == 999 else "") for i, line in enumerate(lines))
    data = block.encode("utf-8")
    with open(target, "wb") as out:
        remaining = size_mb * 1_000_000
        while remaining > 0:
            out.write(data[:remaining])
            remaining -= len(data)
    text = target.read_bytes()  # the cut may split a character: end on the last whole line
    target.write_bytes(text[: text.rfind(b"\n") + 1])


def measure(path: Path, tokenizer: str, vocab_size: int) -> dict[str, float]:
    """Load the data in a fresh process; its wall time and peak memory."""
    code = (
        "import json, resource, sys, time\n"
        "from trainer.data.text import text\n"  # torch's import (~1 s) is not the data's
        "imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "start = time.perf_counter()\n"
        f"data = text({str(path)!r}, tokenizer={tokenizer!r}, vocab_size={vocab_size})\n"
        "seconds = time.perf_counter() - start\n"
        "tokens = sum(len(s.tokens) for s in (data.train, data.val, data.test))\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print(json.dumps({'seconds': seconds, 'peak_mb': peak, 'import_mb': imported,\n"
        "                  'tokens': tokens,\n"
        "                  'vocab_size': data.spec.vocab_size}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(label: str, size_mb: float, run: dict[str, float]) -> None:
    print(f"{label:<24} {run['seconds']:8.2f} s  {size_mb / run['seconds']:8.1f} MB/s  "
          f"peak {run['peak_mb']:5.0f} MB ({run['import_mb']:.0f} after imports)  "
          f"{run['tokens']:>11,} tokens  "
          f"vocab {run['vocab_size']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--skip-bpe", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "corpus.txt"
        started = time.perf_counter()
        generate(args.source, path, args.size_mb)
        size_mb = path.stat().st_size / 1e6
        print(f"generated {size_mb:.0f} MB in {time.perf_counter() - started:.1f} s: {path}")
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"(this process, which generated it: peak {baseline:.0f} MB)")
        report("char, first run", size_mb, measure(path, "char", args.vocab_size))
        report("char, cache hit", size_mb, measure(path, "char", args.vocab_size))
        seconds, peak = until_step(["model=transformer", "data=text", f"data.path={path}"],
                                   Path(folder), steps=1)
        print(f"`train model=transformer data=text`, cached: first step after {seconds:.1f} s, "
              f"peak {peak:.0f} MB (all processes)", flush=True)
        if not args.skip_bpe:
            report(f"bpe{args.vocab_size}, first run", size_mb,
                   measure(path, "bpe", args.vocab_size))
            report(f"bpe{args.vocab_size}, cache hit", size_mb,
                   measure(path, "bpe", args.vocab_size))


if __name__ == "__main__":
    main()
