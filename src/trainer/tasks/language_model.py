from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from trainer.data import DataSpec, Split
from trainer.tasks.base import Task, as_count, mean_of


class LanguageModel(Task):
    """Next-token prediction; loss in nats per token, perplexity, and bits per UTF-8 byte (bpb),
    which compares models across tokenizers: a token of several bytes is harder to predict."""

    unit = "tokens"
    sample_length = 300  # tokens sampled at each validation...
    sample_seconds = 2.0  # ...or fewer, when sampling takes longer than this

    served_input = "token ids (int64), at most block_size of them per row"
    served_output = "next-token scores (logits) at every position"
    use_command = "generate run_dir=RUN"

    def model_sizes(self, spec: DataSpec) -> dict[str, Any]:
        return {"vocab_size": spec.vocab_size, "block_size": spec.block_size}

    def build_model(self, cfg: DictConfig, spec: DataSpec) -> nn.Module:
        assert spec.tokenizer is not None, "text data comes with its tokenizer"
        self.tokenizer = spec.tokenizer
        self.token_bytes = spec.tokenizer.token_bytes()
        return super().build_model(cfg, spec)

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor],
                      stage: int) -> tuple[Tensor, dict[str, Tensor]]:
        inputs, targets = batch
        logits = model(inputs)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()), {}

    def eval_step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        inputs, targets = batch
        logits = model(inputs).float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        if self.token_bytes.device != targets.device:  # once: the table then stays there
            self.token_bytes = self.token_bytes.to(targets.device)
        text_bytes = self.token_bytes[targets].sum().to(loss.dtype)
        return {"loss": loss, "bytes": text_bytes, "count": as_count(targets.numel(), loss)}

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        metrics = mean_of(totals, "loss")
        # Summed nats over summed bytes, not a mean of per-batch ratios, so batches and ranks
        # add up exactly; targets of only special tokens (no bytes) have no bpb.
        bpb = totals["loss"] / (math.log(2) * totals["bytes"]) if totals["bytes"] else math.nan
        return {**metrics, "ppl": math.exp(min(metrics["loss"], 50.0)), "bpb": bpb}

    def show(self, model: nn.Module, split: Split, logger: Any, step: int) -> None:
        prompt, _ = split.batch(torch.zeros(1, dtype=torch.long, device=_device(model)))
        text = generate(model, prompt[0, :16], self.sample_length, seed=step,
                        seconds=self.sample_seconds)
        decoded = self.tokenizer.decode(text.tolist())
        logger.text("samples/text", decoded, step)


def generate(model: nn.Module, prompt: Tensor, length: int, seed: int = 0,
             temperature: float = 1.0, seconds: float = math.inf,
             top_k: int | None = None) -> Tensor:
    """The prompt and up to `length` tokens sampled after it (fewer if `seconds` run out)."""
    return torch.cat([prompt, *sample(model, prompt, length, seed, temperature, seconds, top_k)])


@torch.no_grad()
def sample(model: nn.Module, prompt: Tensor, length: int, seed: int = 0,
           temperature: float = 1.0, seconds: float = math.inf,
           top_k: int | None = None) -> Iterator[Tensor]:
    """Yield up to `length` tokens (each a tensor of one id) sampled after `prompt`, each from the
    `top_k` most likely (all when None), the logits divided by `temperature`.

    A model with `decode` (the transformer's key-value cache, the LSTM's state) pays one position
    per token: a transformer whose context fills starts its cache again from the last half of
    it. Other models are given the whole (cropped) context each token.
    """
    context = getattr(model, "context", 0) or len(prompt)
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    tokens, state, fed = prompt.clone(), None, 0  # fed: the tokens the state or cache holds
    # Sharded (FSDP): every rank must run the same whole-model forwards, and as many of them.
    sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
    deadline = math.inf if sharded else time.monotonic() + seconds
    try:
        for _ in range(length):
            if sharded or not hasattr(model, "decode"):
                logits = model(tokens[-context:][None])[0, -1]
            else:
                window = isinstance(state, list) and fed >= context  # a full key-value cache
                if state is None or window:  # (re)start from as much context as fits, or half
                    keep = tokens[-(context // 2 if window else context):]
                    logits, state = model.decode(keep[None])
                    fed = len(keep)
                else:
                    logits, state = model.decode(tokens[-1:][None], state)
                    fed += 1
                logits = logits[0]
            token = _draw(logits.float() / temperature, top_k, generator)
            tokens = torch.cat([tokens, token])
            yield token
            if time.monotonic() > deadline:
                break
    finally:
        model.train(was_training)


def _draw(logits: Tensor, top_k: int | None, generator: torch.Generator) -> Tensor:
    if top_k is not None and top_k < logits.numel():
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, -math.inf)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
