"""The int8 ONNX export against the float one, for finished runs: file size, onnxruntime's time
per batch on this CPU (median of alternating rounds), and how often the two agree.

    python scripts/benchmark_int8.py RUN [RUN ...] [--batch 8] [--rounds 30]

Each run is exported twice (format=onnx and format=onnx_int8, into RUN/export) as
`export-model` does it; the inputs are the test inputs' shape at --batch rows (random images in
[-1, 1], or random token ids one context long).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime
from omegaconf import OmegaConf

from trainer.use.jobs import export_job


def session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def inputs(described: dict, batch: int) -> np.ndarray:
    shape = [batch, *described["input"]["shape"][1:]]
    generator = np.random.default_rng(0)
    if described["input"]["dtype"] == "int64":
        vocabulary = len(described.get("tokenizer", {}).get("vocabulary", "")) or 50
        return generator.integers(0, vocabulary, size=shape, dtype=np.int64)
    return generator.uniform(-1, 1, size=shape).astype(np.float32)


def seconds(run: onnxruntime.InferenceSession, x: np.ndarray) -> float:
    start = time.perf_counter()
    run.run(None, {"input": x})
    return time.perf_counter() - start


def compare(run_dir: Path, batch: int, rounds: int) -> dict:
    for fmt in ("onnx", "onnx_int8"):
        with contextlib.redirect_stdout(io.StringIO()):  # its JSON line
            export_job(OmegaConf.create({"run_dir": str(run_dir), "checkpoint": "best",
                                         "format": fmt, "outputs": None, "count": 16,
                                         "device": "cpu"}))
    folder = run_dir / "export"
    described = json.loads((folder / "export.json").read_text())
    float_model, int8_model = session(folder / "model.onnx"), session(folder / "model.int8.onnx")
    x = inputs(described, batch)
    for model in (float_model, int8_model):  # warm up
        model.run(None, {"input": x})
    times: dict[str, list[float]] = {"float": [], "int8": []}
    for _ in range(rounds):  # alternating, so the machine's noise falls on both
        times["float"].append(seconds(float_model, x))
        times["int8"].append(seconds(int8_model, x))
    ms = {name: statistics.median(values) * 1000 for name, values in times.items()}
    entry = described["formats"]["onnx_int8"]
    return {"run": str(run_dir), "model": described["model"],
            "float_mb": entry["float_bytes"] / 1e6,
            "int8_mb": entry["bytes"] / 1e6, "float_ms": ms["float"], "int8_ms": ms["int8"],
            "speedup": ms["float"] / ms["int8"], "top1_agreement": entry.get("top1_agreement"),
            "max_abs_diff": entry["max_abs_diff"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    rows = [compare(run, args.batch, args.rounds) for run in args.runs]
    print(f"{'run':12} {'model':12} {'float MB':>9} {'int8 MB':>8} {'float ms':>9} {'int8 ms':>8} "
          f"{'speed-up':>8} {'top-1 agree':>11}")
    for row in rows:
        agree = "-" if row["top1_agreement"] is None else f"{row['top1_agreement']:.1%}"
        print(f"{Path(row['run']).name:12} {row['model']:12} {row['float_mb']:9.2f} "
              f"{row['int8_mb']:8.2f} {row['float_ms']:9.2f} {row['int8_ms']:8.2f} "
              f"{row['speedup']:7.2f}x {agree:>11}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
