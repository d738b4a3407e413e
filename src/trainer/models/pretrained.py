"""A torchvision classification network as the CNN's feature extractor (`model.backbone=NAME`):
its own classifier removed, its preprocessing (input size, mean, std) done inside the model, and
its weights from torchvision's cache, a file, or none."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.errors import UserError

# False while a finished run's model is rebuilt: its checkpoint holds every weight.
_LOAD_PRETRAINED = ContextVar("load_pretrained", default=True)


@contextmanager
def weights_from_checkpoint() -> Iterator[None]:
    """Build backbones without reading their pretrained weights (torchvision's cache, or the
    file model.weights names): a checkpoint about to be loaded holds them, and the machine a
    finished run is used on may have neither."""
    token = _LOAD_PRETRAINED.set(False)
    try:
        yield
    finally:
        _LOAD_PRETRAINED.reset(token)


class Preprocess(nn.Module):
    """Images in [-1, 1] as the backbone was trained to see them: three channels, its input
    size, normalised with its mean and std."""

    def __init__(self, mean: list[float], std: list[float], size: int | None) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # grey: the same value in every channel
        if self.size and images.shape[-2:] != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear",
                                   antialias=True, align_corners=False)
        return ((images + 1) / 2 - self.mean) / self.std


def backbone(name: str, weights: str | None, input_size: int | str | None, image_size: int
             ) -> tuple[nn.Module, int]:
    """The network `name` without its last Linear layer (the classifier, replaced by the
    caller), preceded by its preprocessing; and the width of the features it gives."""
    from torchvision.models import get_model, get_model_weights

    _check_name(name)
    if isinstance(input_size, str) and input_size != "auto":
        raise UserError(f"model.input_size={input_size!r} is not accepted: auto, a size in "
                        "pixels, or null (the data's size)")
    known = get_model_weights(name)
    load = _LOAD_PRETRAINED.get()
    chosen = _torchvision_weights(known, weights, file_must_exist=load)
    network = get_model(name, weights=None)
    if load and chosen is not None:  # else a checkpoint's weights replace these
        network.load_state_dict(_cached_state(name, chosen))
    elif load and weights is not None:
        try:
            network.load_state_dict(_file_state(weights))
        except RuntimeError as error:
            raise UserError(f"model.weights={weights!r} is not a state_dict of {name}: "
                            f"{str(error).splitlines()[1].strip()}") from None
    preset = (chosen or known.DEFAULT).transforms()  # mean, std and size of its training
    size = preset.crop_size[0] if input_size == "auto" else input_size
    width = _without_classifier(network, name)
    features = nn.Sequential(Preprocess(preset.mean, preset.std, size), network)
    if input_size != "auto":
        _check_size(features, name, size or image_size, input_size)
    return features, width


def _check_size(features: nn.Module, name: str, size: int, input_size: int | None) -> None:
    """A backbone's downsampling may not fit a small image: say so now, not mid-step."""
    try:
        with torch.no_grad():
            features.eval()(torch.zeros(1, 1, size, size))
    except RuntimeError as error:
        shown = "null" if input_size is None else input_size
        raise UserError(f"model.input_size={shown}: {name} cannot take {size}x{size} "
                        f"images ({str(error).splitlines()[0]}); use model.input_size=auto "
                        "(its own size) or a larger one") from None
    finally:
        features.train()


def _check_name(name: str) -> None:
    import torchvision
    from torchvision.models import list_models

    names = list_models(module=torchvision.models)  # classification networks only
    if name not in names:
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
        raise UserError(f"model.backbone={name!r} is not a torchvision classification model"
                        f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}; "
                        "see torchvision.models.list_models(module=torchvision.models)")


def _torchvision_weights(known: Any, weights: str | None, file_must_exist: bool = True) -> Any:
    """The torchvision weights enum member `weights` names (DEFAULT or a member such as
    IMAGENET1K_V2), or None for no weights or a file."""
    if weights is None:
        return None
    if weights == "DEFAULT" or weights in known.__members__:
        return known[weights]
    if Path(weights).expanduser().is_file() or not file_must_exist:
        return None
    raise UserError(f"model.weights={weights!r} is neither a file nor weights of this backbone: "
                    f"use DEFAULT, {', '.join(known.__members__)}, a file of its state_dict, "
                    "or null")


def _cached_state(name: str, weights: Any) -> dict[str, Tensor]:
    """torchvision's weights from the torch hub cache (downloaded there once, if online)."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"model.weights={weights.name}: {name}'s weights are not at {cached} "
                        f"and could not be downloaded ({reason}); download {weights.url} to "
                        "that path (or set TORCH_HOME), or give model.weights=FILE") from None


def _file_state(path: str) -> dict[str, Tensor]:
    file = Path(path).expanduser()
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch and safetensors raise many types
        raise UserError(f"model.weights={path!r} is not a readable state_dict file "
                        f"({str(error).splitlines()[0] if str(error) else error!r})") from None
    return state


def _without_classifier(network: nn.Module, name: str) -> int:
    """Replace the network's last Linear layer (its classifier, in every torchvision
    classification network but squeezenet's) by an identity; return its input width."""
    linears = [(n, m) for n, m in network.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"model.backbone={name!r} has no Linear classifier to replace; choose "
                        "another backbone")
    path, last = linears[-1]
    parent = network.get_submodule(path.rpartition(".")[0]) if "." in path else network
    setattr(parent, path.rpartition(".")[2], nn.Identity())
    return last.in_features
