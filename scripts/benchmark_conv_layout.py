"""Training-step time of the convolutional models in each memory layout and precision, on this
machine's CPU (or `--device cuda`): what device.channels_last=auto and device.precision=bf16 buy.

    python scripts/benchmark_conv_layout.py [--device cpu] [--steps 12]

Each case trains its own copy of the model (AdamW, batch 128, 28x28 grey images) for `steps`
steps; the median step after two warm-up steps is reported, cases interleaved round by round so
the machine's drift falls on all of them alike.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F

from trainer.models.autoencoder import Autoencoder
from trainer.models.cnn import CNN
from trainer.models.gan import GAN

MODELS = {
    "resnet (resnet_fashion_mnist)": lambda: CNN((1, 28, 28), 10, width=32, depth=3,
                                                 residual=True),
    "cnn with batch norm (cnn_mnist)": lambda: CNN((1, 28, 28), 10, width=32, depth=2,
                                                   batch_norm=True),
    "conv autoencoder (vae_mnist's shape)": lambda: Autoencoder((1, 28, 28), conv=True),
    "dcgan generator (dcgan_mnist)": lambda: GAN((1, 28, 28), conv=True, width=64).generator,
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
    args = parser.parse_args()
    device = torch.device(args.device)
    images = torch.randn(128, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (128,), device=device)
    cases = list(itertools.product(MODELS, (False, True), ("32", "bf16")))
    runs = {}
    for name, channels_last, precision in cases:
        torch.manual_seed(0)
        model = MODELS[name]().to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        runs[name, channels_last, precision] = (model, torch.optim.AdamW(model.parameters()), [])
    for _ in range(args.steps):
        for (name, _, precision), (model, optimizer, times) in runs.items():
            start = time.perf_counter()
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                loss = loss_of(name, model, images, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    print(f"{'model':38} {'layout':14} {'precision':9} {'ms/step':>8} {'speed-up':>8}")
    for (name, channels_last, precision), (_, _, times) in runs.items():
        ms = 1000 * statistics.median(times[2:])
        base = 1000 * statistics.median(runs[name, False, "32"][2][2:])
        layout = "channels_last" if channels_last else "contiguous"
        print(f"{name:38} {layout:14} {precision:9} {ms:8.0f} {base / ms:7.2f}x")


if __name__ == "__main__":
    main()
