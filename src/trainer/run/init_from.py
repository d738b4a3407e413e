"""`init_from=RUN`: a new run that starts from another run's weights, where they fit.

Before the data is built, text for a character model is encoded in the source's vocabulary
(`encode_as_source`); once the model is built, the source's tensors whose names and shapes fit
are loaded into it (`weights_from_source`), a LoRA run's adapters merged where the new model has
none, and the log says what was loaded and what starts fresh.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig
from torch import nn

from trainer.checkpoint import load, resume_path
from trainer.config import saved_config
from trainer.errors import UserError, listed
from trainer.logging import shown
from trainer.models.lora import ADAPTER, merged
from trainer.targets import instantiate

if TYPE_CHECKING:
    from trainer.run.state import Setup

log = logging.getLogger("trainer")


def encode_as_source(cfg: DictConfig) -> None:
    """init_from= a character model, for text of no other characters: the text encoded in the
    source's vocabulary (data.vocabulary, saved with the run's config), so that its embedding
    and output layer fit rather than start fresh."""
    if cfg.data.get("tokenizer") != "char" or cfg.data.get("vocabulary", "") is not None:
        return  # another tokenizer, a vocabulary given, or data without the key
    tokenizer = source_state(cfg.init_from)[1].get("data", {}).get("tokenizer") or {}
    if tokenizer.get("name") != "char":
        return
    chars = tokenizer["chars"]
    own = instantiate(cfg.data, seed=cfg.seed).spec.tokenizer.chars
    unseen = [repr(char) for char in own if char not in chars]
    if not unseen:
        cfg.data.vocabulary = chars
        said = f"the text is encoded in its vocabulary of {len(chars)} characters " \
            "(data.vocabulary)"
    else:
        said = f"the text keeps its own characters, having {listed(unseen)} besides " \
            "the source's: the embedding starts fresh"
    log.info("init_from=%s: %s", shown(Path(cfg.init_from)), said)


def weights_from_source(s: Setup) -> None:
    """Load init_from's weights into s.model where they fit, and say which; without init_from,
    warn when LoRA adapters would train over random frozen weights."""
    adapters = {name for name, _ in s.model.named_parameters() if ADAPTER.match(name)}
    if not s.cfg.get("init_from"):
        if adapters and s.rt.is_main:
            log.warning("LoRA adapters without init_from: they train over random frozen "
                        "weights; give init_from=RUN to fine-tune a trained run's weights")
        return
    loaded, fresh = load_matching(s.model, s.cfg.init_from)
    others = [name for name in fresh if name not in adapters]  # adapters are new by design
    # Frozen by LoRA and not loaded, a weight would stay random for good. (A frozen torchvision
    # backbone keeps its pretrained weights where the source's do not fit.)
    stuck = [name for name, weight in s.model.named_parameters()
             if name in others and not weight.requires_grad] if adapters else []
    if stuck:
        raise UserError(f"init_from={s.cfg.init_from}: {', '.join(stuck[:4])} did not fit this "
                        "model, and frozen by model.lora_rank they would stay random: give the "
                        "source run's data shape (for text, its characters or tokenizer) or "
                        "fine-tune without adapters (model.lora_rank=0)")
    notes = [f"{len(loaded)} tensors loaded"]
    if others:
        notes.append(f"fresh: {', '.join(others[:6])}{' ...' if len(others) > 6 else ''}")
    if adapters - set(loaded):
        notes.append(f"{len(adapters - set(loaded))} LoRA adapter tensors added (at first they "
                     "change nothing)")
    log.info("init_from=%s: %s", shown(Path(s.cfg.init_from)), "; ".join(notes))


def load_matching(model: nn.Module, source: str) -> tuple[list[str], list[str]]:
    """init_from=: into `model`, the weights of another run (its best.pt, or the checkpoint
    file given) whose names and shapes match; the rest keep their fresh initialisation (a head
    for other classes). Returns the names loaded and those left fresh."""
    path, state = source_state(source)
    own = model.state_dict()
    weights = state["model"]
    saved_model = state["config"].get("model", {})
    if saved_model.get("lora_rank") and not any(ADAPTER.match(name) for name in own):
        # A fine-tuned run into a model without adapters: their change merged into the weights.
        weights = merged(weights, saved_model.get("lora_alpha", 16) / saved_model["lora_rank"])
    matched = {name: tensor for name, tensor in weights.items()
               if name in own and own[name].shape == tensor.shape}
    if not matched:
        options = " ".join(f"model.{key}={saved_model[key]}" for key in ("width", "depth")
                           if key in saved_model)
        kind = str(saved_model.get("_target_", "?")).rsplit(".", 1)[-1].lower()
        raise UserError(f"init_from={source}: no weight of {path} fits this model; that run "
                        f"trained {kind} with {options or 'its own sizes'}: give the same model "
                        "options")
    model.load_state_dict(matched, strict=False)
    return list(matched), [name for name in own if name not in matched]


def source_state(source: str, check_only: bool = False) -> tuple[Path, dict]:
    """init_from's checkpoint and its state, its config checked as every saved config is: only
    its weights, data spec and model sizes are used, but a run from elsewhere is data.
    `check_only`: its tensors mapped rather than read, for a look before the run starts."""
    path = resume_path(source, "best")
    state = load(path, mmap=check_only)
    saved_config(state["config"], path)
    return path, state
