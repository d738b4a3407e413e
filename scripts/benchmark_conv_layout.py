"""Training-step time of the convolutional models in each memory layout and precision, on this
machine's CPU (or `--device cuda`): what device.channels_last=auto and device.precision=bf16 buy.

    python scripts/benchmark_conv_layout.py [--device cpu] [--steps 12] [--only NAME] [--json F]

A CPU without bf16 instructions (AVX-512 BF16, AMX) can be imitated on one that has them:
`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` keeps oneDNN and ATen to AVX2 kernels.

Each case trains its own copy of the model (AdamW, batch 128, the preset's image size) for
`steps` steps; the median step after two warm-up steps is reported, cases interleaved round by
round so the machine's drift falls on all of them alike. scripts/gpu_check.sh runs it on CUDA.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from fashion_mnist_candidates import ARCHS, Candidate  # beside this script

from trainer.models.autoencoder import Autoencoder
from trainer.models.cnn import CNN
from trainer.models.gan import GAN

GREY, COLOUR = (1, 28, 28), (3, 32, 32)
MODELS = {  # name: (the model, the images it takes)
    "resnet (resnet_fashion_mnist)": (lambda: CNN(GREY, 10, width=32, depth=3, residual=True),
                                      GREY),
    "cnn with batch norm (cnn_mnist)": (lambda: CNN(GREY, 10, width=32, depth=2,
                                                    batch_norm=True), GREY),
    "conv autoencoder (vae_mnist's shape)": (lambda: Autoencoder(GREY, conv=True), GREY),
    "dcgan generator (dcgan_mnist)": (lambda: GAN(GREY, conv=True, width=64).generator, GREY),
    "whitened resnet (airbench_cifar10)": (lambda: CNN(COLOUR, 10, width=64, depth=3,
                                                       residual=True, whiten=True), COLOUR),
    # The cheaper networks tried for resnet_fashion_mnist (BENCHMARKS.md)
    "fashion candidate pooled_resnet": (lambda: Candidate(GREY, 10, arch="pooled_resnet",
                                                          width=32, depth=3, residual=True), GREY),
    **{f"fashion candidate {arch}": (lambda arch=arch: Candidate(GREY, 10, arch=arch), GREY)
       for arch in ARCHS},
}


def loss_of(name: str, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
            ) -> torch.Tensor:
    if name.startswith("dcgan"):
        return model(torch.randn(len(images), 32, device=images.device)).float().square().mean()
    if name.startswith("conv autoencoder"):
        return F.mse_loss(model(images).float(), images)
    return F.cross_entropy(model(images).float(), labels)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--only", default="", help="the models whose name holds this text")
    parser.add_argument("--json", help="also write the table to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    batches = {shape: torch.randn(128, *shape, device=device) for shape in (GREY, COLOUR)}
    labels = torch.randint(0, 10, (128,), device=device)
    names = [name for name in MODELS if args.only in name]
    cases = list(itertools.product(names, (False, True), ("32", "bf16")))
    runs = {}
    for name, channels_last, precision in cases:
        torch.manual_seed(0)
        model = MODELS[name][0]().to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        runs[name, channels_last, precision] = (model, torch.optim.AdamW(model.parameters()), [])
    for _ in range(args.steps):
        for (name, _, precision), (model, optimizer, times) in runs.items():
            start = time.perf_counter()
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                loss = loss_of(name, model, batches[MODELS[name][1]], labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    print(f"{'model':38} {'layout':14} {'precision':9} {'ms/step':>8} {'speed-up':>8}")
    table = []
    for (name, channels_last, precision), (_, _, times) in runs.items():
        ms = 1000 * statistics.median(times[2:])
        base = 1000 * statistics.median(runs[name, False, "32"][2][2:])
        layout = "channels_last" if channels_last else "contiguous"
        print(f"{name:38} {layout:14} {precision:9} {ms:8.1f} {base / ms:7.2f}x")
        table.append({"model": name, "layout": layout, "precision": precision,
                      "ms_per_step": round(ms, 2), "speed_up": round(base / ms, 3)})
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
