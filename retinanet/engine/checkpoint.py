"""Checkpoints: plain dicts of tensors and primitives, written atomically and read with weights_only=True.

A checkpoint written by train.py holds "model" (the state dict), "model_settings" (the model's recipe,
settings.ModelSettings), "class_names", and the training state: "optimizer", "scheduler", "scaler", "epoch",
"iteration", "rng_state", "args". engine/models.py's load_model rebuilds its model from checkpoint_settings, exactly
the model that was trained. A bare state dict, such as the COCO weights yhenon/pytorch-retinanet publishes, is read
as one of yhenon's models (interop.py): its depth, class count and anchors per location from the tensors' shapes.
"""

import os
import pickle
import re
from typing import NamedTuple

import torch

from ..data.files import write_atomically
from ..model import RetinaNet
from ..settings import RESNET_BLOCKS, ModelSettings
from .interop import YHENON_SETTINGS, from_yhenon
from .runtime import random_state, restore_random_state

WRAPPER_PREFIX = "module."  # what (Distributed)DataParallel adds to every key of the model it wraps
CLASSIFICATION_OUTPUT = "classification_subnet.output."  # the layer fine-tuning on new classes starts afresh
SHAPE_SETTINGS = ("depth", "p6_from", "num_anchors")  # change the tensors' shapes: fixed by the weights


def save_checkpoint(checkpoint: dict, path: str) -> None:
    """Write `checkpoint` to `path` so that a crash at any moment leaves either the old file or the new one."""
    write_atomically(path, lambda file: torch.save(checkpoint, file), binary=True)


def read_checkpoint(path: str) -> dict:
    """Read a checkpoint or state dict safely: only tensors and primitives, never code."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: checkpoint not found")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, expected a checkpoint file (e.g. {os.path.join(path, 'best.pt')})")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe_global = re.search(r"GLOBAL (\S+)", str(error))
        found = f"it refers to {unsafe_global[1]}" if unsafe_global else str(error).splitlines()[0]
        raise ValueError(
            f"{path}: refused to load. The file holds Python objects other than tensors and plain values, and "
            f"unpickling them could run arbitrary code ({found}). A whole pickled model is such a file: "
            f"yhenon/pytorch-retinanet's train.py saves one with torch.save(retinanet.module, ...). If you trust "
            f"the file, re-save only its state dict, from where the code that saved it can be imported (for "
            f"yhenon's, a clone of that repository): python -c \"import torch; model = torch.load('{path}', "
            f"weights_only=False); torch.save(model.state_dict(), 'weights.pt')\", then use weights.pt."
        ) from error
    except (RuntimeError, EOFError) as error:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {error}") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a dict (a checkpoint or a state dict), found {type(checkpoint).__name__}")
    return checkpoint


def model_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model's state dict in a train.py checkpoint, or the checkpoint itself if it is a bare state dict, with
    this project's parameter names (yhenon's renamed). Keys saved from a DataParallel or DistributedDataParallel
    wrapper ("module.conv1.weight") lose the prefix."""
    state_dict = checkpoint["model"] if "model" in checkpoint else checkpoint
    if state_dict and all(key.startswith(WRAPPER_PREFIX) for key in state_dict):
        state_dict = {key[len(WRAPPER_PREFIX):]: value for key, value in state_dict.items()}
    return {from_yhenon(key): value for key, value in state_dict.items()}


class Architecture(NamedTuple):
    """What the tensors of a RetinaNet state dict fix."""

    depth: int
    num_classes: int
    num_anchors: int  # A, per location


def infer_architecture(state_dict: dict[str, torch.Tensor]) -> Architecture:
    """Depth, class count and anchors per location of a RetinaNet state dict (this project's names), from the
    number and kind of residual blocks and the subnets' output channels (4A boxes, KA classes)."""
    if f"{CLASSIFICATION_OUTPUT}weight" not in state_dict or "box_subnet.output.weight" not in state_dict:
        raise ValueError("not a RetinaNet state dict: it has no classification and box subnet outputs")
    num_anchors = state_dict["box_subnet.output.weight"].shape[0] // 4
    num_classes = state_dict[f"{CLASSIFICATION_OUTPUT}weight"].shape[0] // num_anchors
    blocks = tuple(
        len({key.split(".")[2] for key in state_dict if key.startswith(f"backbone.layer{stage}.")})
        for stage in range(1, 5)
    )
    bottleneck = "backbone.layer1.0.conv3.weight" in state_dict  # ResNet-50 and deeper (model.ResNet)
    for depth, layout in RESNET_BLOCKS.items():
        if layout == blocks and (depth >= 50) == bottleneck:
            return Architecture(depth, num_classes, num_anchors)
    raise ValueError(f"not a ResNet backbone of a known depth: blocks per stage {blocks}")


def checkpoint_settings(checkpoint: dict) -> ModelSettings:
    """The recipe of the model in a checkpoint; for a bare state dict, yhenon's with the tensors' architecture."""
    architecture = infer_architecture(model_state_dict(checkpoint))
    if "model_settings" in checkpoint:
        stored = checkpoint["model_settings"]
    else:
        stored = dict(YHENON_SETTINGS, depth=architecture.depth, num_classes=architecture.num_classes)
    settings = ModelSettings(**stored)
    found = Architecture(settings.depth, settings.num_classes, settings.num_anchors)
    if found != architecture:
        raise ValueError(f"the checkpoint's settings describe {found}, its weights {architecture}")
    return settings


def resumed_settings(checkpoint: dict, path: str, requested: dict, num_classes: int) -> ModelSettings:
    """The settings of a run resumed from `checkpoint` (read from `path`): the checkpoint's own. The class count of
    the data and the settings in `requested` (those a user asked for) must be the same: a ValueError says what
    differs, and how to go on."""
    settings = checkpoint_settings(checkpoint)
    depth = requested.get("depth", settings.depth)
    if (depth, num_classes) != (settings.depth, settings.num_classes):
        raise ValueError(
            f"{path}: holds a ResNet-{settings.depth} RetinaNet for {settings.num_classes} classes, but this run "
            f"builds a ResNet-{depth} for {num_classes} classes. Resume with the run's own --depth and data, or "
            f"start from it with --fine_tune to train it on other classes."
        )
    differences = [f"{name} {getattr(settings, name)} (asked for: {value})" for name, value in requested.items()
                   if getattr(settings, name) != value]
    if differences:
        raise ValueError(
            f"{path}: the run was trained with {'; '.join(differences)}. A resumed run keeps the settings of its "
            f"model: leave those flags out, or start a new run from this checkpoint with --fine_tune."
        )
    return settings


def training_state(model: RetinaNet, optimizer, scheduler, scaler, **progress) -> dict:
    """The checkpoint of a training run: the model and its recipe, the optimizer, lr schedule and grad scaler, the
    random state and the loss normaliser's moving average (all a resumed run needs to go on as if it had never
    stopped), and `progress` (iteration, class names, ...)."""
    return {
        "model": model.state_dict(), "model_settings": model.settings.as_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng_state": random_state(),
        "loss_normalizer_ema": float(model.loss.foreground_ema), **progress,
    }


def restore_training_state(checkpoint: dict, path: str, model: RetinaNet, optimizer, scheduler, scaler) -> None:
    """Put the model (rebuilt from the checkpoint's settings), optimizer, schedule, grad scaler, random state and
    loss normaliser back as a checkpoint of training_state holds them."""
    if "optimizer" not in checkpoint:
        raise ValueError(f"{path}: a bare state dict cannot be resumed; use --fine_tune to start from it")
    model.load_state_dict(model_state_dict(checkpoint))
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    model.loss.foreground_ema.fill_(checkpoint["loss_normalizer_ema"])
    restore_random_state(checkpoint["rng_state"])


def class_names_of(checkpoint: dict) -> list[str]:
    """The class names of a checkpoint's model (index = label): "0", "1", ... for a bare state dict."""
    names = checkpoint.get("class_names")
    return list(names) if names else [str(label) for label in range(checkpoint_settings(checkpoint).num_classes)]
