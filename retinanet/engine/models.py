"""The one way to build a RetinaNet and the one way to load a trained one.

    model = build_model(ModelSettings(num_classes=80, **initial_freezing(True)), pretrained=True)
    model, class_names = load_model("output/best.pt")

build_model starts the backbone from torchvision's ImageNet weights or from scratch (paper §4.1 "Initialization":
"The base ResNet-50 and ResNet-101 models are pre-trained on ImageNet1k"); load_model rebuilds the model of a
checkpoint of train.py, of tools/convert_torchvision.py or a bare state dict of yhenon/pytorch-retinanet, with its
weights, from the settings it stores (checkpoint.py).
"""

import os
import urllib.error
from typing import NamedTuple

import torch
import torchvision

from ..model import ResNet, RetinaNet
from ..settings import ModelSettings
from .checkpoint import (CLASSIFICATION_OUTPUT, SHAPE_SETTINGS, checkpoint_settings, class_names_of, model_state_dict,
                         read_checkpoint)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be downloaded or found; the message says how to proceed."""


def imagenet_state_dict(depth: int, pretrained: bool | str | os.PathLike) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for a ResNet of `depth`, from the torch hub cache, the internet, or a path."""
    if not isinstance(pretrained, bool):
        return torch.load(pretrained, map_location="cpu", weights_only=True)
    weights = torchvision.models.get_weight(f"ResNet{depth}_Weights.IMAGENET1K_V1")
    try:
        return weights.get_state_dict(progress=True)
    except (urllib.error.URLError, OSError) as error:
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise WeightsUnavailableError(
            f"Could not get the ImageNet weights of ResNet-{depth} ({error}). They are downloaded from "
            f"{weights.url}, and this machine seems to have no internet access. Either train from scratch "
            f"(--no_pretrained in train.py, pretrained=False in Python; BatchNorm then stays trainable), or "
            f"download that file on another machine and put it at {cache}, where torchvision looks first, or "
            f"pass the file's path instead (--pretrained PATH, or pretrained='PATH')."
        ) from error


def load_backbone_weights(backbone: ResNet, state_dict: dict[str, torch.Tensor]) -> None:
    """Load an ImageNet ResNet state dict into the backbone; every backbone tensor must be there."""
    state_dict = {key: value for key, value in state_dict.items() if not key.startswith("fc.")}  # the classifier
    missing, unexpected = backbone.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"The ImageNet weights do not fit a ResNet-{backbone.depth}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def build_model(settings: ModelSettings, pretrained: bool | str | os.PathLike = False) -> RetinaNet:
    """A new RetinaNet of `settings`, its backbone from ImageNet weights (`pretrained` True: torchvision's, or the
    path of such a file) or from scratch (False). The settings say what stays frozen (settings.initial_freezing
    gives what suits weights that start trained)."""
    model = RetinaNet(settings)
    if pretrained is not False:
        load_backbone_weights(model.backbone, imagenet_state_dict(settings.depth, pretrained))
    return model


class LoadedModel(NamedTuple):
    """A trained model and its class names (index = label); its settings say everything else, the image size it
    was trained at included."""

    model: RetinaNet
    class_names: list[str]


def load_model(checkpoint: str | dict, device: str | torch.device = "cpu", num_classes: int | None = None,
               **changes) -> LoadedModel:
    """The model of a checkpoint (its path, or its contents where the caller has read it already) in eval mode on
    `device`, with its class names.

    `changes` are settings to run it with instead of the checkpoint's (image sizes, thresholds, freezing, ...);
    those that fix tensor shapes (SHAPE_SETTINGS) cannot change. With another `num_classes` (fine-tuning on other
    classes), every weight but the classification output layer is loaded; that layer starts afresh, with the
    prior's bias (§4.1 "Initialization"), and the class names are "0", "1", ... until the caller names them.
    """
    checkpoint = read_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    settings = checkpoint_settings(checkpoint)
    new_settings = settings.replace(num_classes=num_classes or settings.num_classes, **changes)
    fixed = [f"{name} {getattr(settings, name)} (not {getattr(new_settings, name)})" for name in SHAPE_SETTINGS
             if getattr(new_settings, name) != getattr(settings, name)]
    if fixed:
        raise ValueError(f"the checkpoint's weights fix {', '.join(fixed)}")
    model = RetinaNet(new_settings)
    state_dict = model_state_dict(checkpoint)
    class_names = class_names_of(checkpoint)
    if new_settings.num_classes != settings.num_classes:
        fresh = {key: value for key, value in model.state_dict().items() if key.startswith(CLASSIFICATION_OUTPUT)}
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith(CLASSIFICATION_OUTPUT)}
        state_dict |= fresh
        class_names = [str(label) for label in range(new_settings.num_classes)]
    model.load_state_dict(state_dict)
    return LoadedModel(model.to(device).eval(), class_names)
