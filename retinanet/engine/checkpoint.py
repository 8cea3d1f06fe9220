"""Checkpoints: plain dicts of tensors and primitives, written atomically and read with weights_only=True.

A checkpoint written by train.py holds "model" (the state dict), "model_settings" (the model's recipe,
settings.ModelSettings), "class_names", and the training state: "optimizer", "scheduler", "scaler", "epoch",
"iteration", "rng_state", "args". Everything that reads a checkpoint builds its model with model_from_checkpoint,
which rebuilds exactly the model that was trained. A bare state dict, such as the COCO weights
yhenon/pytorch-retinanet publishes, is accepted wherever a model is read: its depth, class count and anchors per
location come from the tensors' shapes, everything else from yhenon's recipe (settings.YHENON_SETTINGS).
"""

import os
import pickle
import re
from typing import NamedTuple

import torch

from ..data.files import write_atomically
from ..losses import EMA_START
from ..model import RESNET_LAYOUTS, RetinaNet, initial_freezing
from .runtime import random_state, restore_random_state
from ..settings import BOX_CODINGS, YHENON_SETTINGS, ModelSettings

WRAPPER_PREFIX = "module."  # what (Distributed)DataParallel adds to every key of the model it wraps
# Parameter names of yhenon/pytorch-retinanet, which this project's checkpoints also used before the model was
# composed of a backbone, an FPN and two subnets as in Figure 3: old prefix -> new prefix.
RENAMED_PREFIXES = {
    "conv1.": "backbone.conv1.", "bn1.": "backbone.bn1.", "layer1.": "backbone.layer1.",
    "layer2.": "backbone.layer2.", "layer3.": "backbone.layer3.", "layer4.": "backbone.layer4.",
    "fpn.P3_1.": "fpn.lateral3.", "fpn.P4_1.": "fpn.lateral4.", "fpn.P5_1.": "fpn.lateral5.",
    "fpn.P3_2.": "fpn.output3.", "fpn.P4_2.": "fpn.output4.", "fpn.P5_2.": "fpn.output5.",
    "fpn.P6.": "fpn.p6.", "fpn.P7_2.": "fpn.p7.",
    "regressionModel.": "box_subnet.", "classificationModel.": "classification_subnet.",
}
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


def renamed_key(key: str) -> str:
    """This project's name of a parameter: yhenon's and older names are renamed (RENAMED_PREFIXES)."""
    for old, new in RENAMED_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def model_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model's state dict in a train.py checkpoint, or the checkpoint itself if it is a bare state dict, with
    this project's parameter names. Keys saved from a DataParallel or DistributedDataParallel wrapper
    ("module.conv1.weight") lose the prefix."""
    state_dict = checkpoint["model"] if "model" in checkpoint else checkpoint
    if state_dict and all(key.startswith(WRAPPER_PREFIX) for key in state_dict):
        state_dict = {key[len(WRAPPER_PREFIX):]: value for key, value in state_dict.items()}
    return {renamed_key(key): value for key, value in state_dict.items()}


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
    bottleneck = "backbone.layer1.0.conv3.weight" in state_dict
    for depth, (block, layout) in RESNET_LAYOUTS.items():
        if layout == blocks and (block.expansion == 4) == bottleneck:
            return Architecture(depth, num_classes, num_anchors)
    raise ValueError(f"not a ResNet backbone of a known depth: blocks per stage {blocks}")


def legacy_settings(checkpoint: dict) -> dict:
    """Settings that checkpoints written before every setting was a model setting keep elsewhere: their image
    sizes, box loss and freezing in the training arguments, and a smooth L1 β that was 1/9 for this project's
    (0.1, 0.1, 0.2, 0.2) coding and an L1 loss (β = 0) for converted torchvision weights (std 1, 1, 1, 1)."""
    settings = checkpoint["model_settings"]
    args = checkpoint.get("args", {})
    legacy = {name: args[name] for name in ("min_size", "max_size", "box_loss", "loss_normalizer")
              if name not in settings and args.get(name) is not None}
    if "smooth_l1_beta" not in settings:
        yhenon_std = tuple(settings.get("box_coder_std", ())) == BOX_CODINGS["yhenon"][0]
        legacy["smooth_l1_beta"] = BOX_CODINGS["yhenon" if yhenon_std else "torchvision"][1]
    if "freeze_bn" not in settings and "pretrained" in args:
        started_trained = args["pretrained"] is not False or args.get("fine_tune") is not None
        legacy |= initial_freezing(started_trained)
        if args.get("freeze_at") is not None:
            legacy["freeze_at"] = args["freeze_at"]
    return legacy


def checkpoint_settings(checkpoint: dict) -> ModelSettings:
    """The recipe of the model in a checkpoint; for a bare state dict, yhenon's with the tensors' architecture."""
    architecture = infer_architecture(model_state_dict(checkpoint))
    if "model_settings" in checkpoint:
        stored = {**checkpoint["model_settings"], **legacy_settings(checkpoint)}
    else:
        stored = dict(YHENON_SETTINGS, depth=architecture.depth, num_classes=architecture.num_classes)
    settings = ModelSettings(**stored)
    found = Architecture(settings.depth, settings.num_classes, settings.num_anchors)
    if found != architecture:
        raise ValueError(f"the checkpoint's settings describe {found}, its weights {architecture}")
    return settings


def model_from_checkpoint(checkpoint: dict, num_classes: int | None = None, **changes) -> RetinaNet:
    """The model of a checkpoint, rebuilt from its settings, with its weights.

    With another `num_classes` (fine-tuning on other classes), every weight but the classification output layer is
    loaded; that layer starts afresh, with the prior's bias (§4.1 "Initialization"). `changes` are other settings
    to change (image sizes, freezing, thresholds, ...); those that fix tensor shapes (SHAPE_SETTINGS) cannot change.
    """
    settings = checkpoint_settings(checkpoint)
    new_settings = settings.replace(num_classes=num_classes or settings.num_classes, **changes)
    fixed = [f"{name} {getattr(settings, name)} (not {getattr(new_settings, name)})" for name in SHAPE_SETTINGS
             if getattr(new_settings, name) != getattr(settings, name)]
    if fixed:
        raise ValueError(f"the checkpoint's weights fix {', '.join(fixed)}")
    model = RetinaNet(new_settings)
    state_dict = model_state_dict(checkpoint)
    if new_settings.num_classes != settings.num_classes:
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith(CLASSIFICATION_OUTPUT)}
        model.load_state_dict(state_dict | {key: value for key, value in model.state_dict().items()
                                            if key.startswith(CLASSIFICATION_OUTPUT)})
    else:
        model.load_state_dict(state_dict)
    return model


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
    model.loss.foreground_ema.fill_(checkpoint.get("loss_normalizer_ema", EMA_START))
    if "rng_state" in checkpoint:
        restore_random_state(checkpoint["rng_state"])


class LoadedModel(NamedTuple):
    """A ready model and its class names (index = label); its settings say everything else, the image size it
    was trained at included."""

    model: RetinaNet
    class_names: list[str]


def load_model(path: str | dict, device: str | torch.device = "cpu", **changes) -> LoadedModel:
    """A RetinaNet in eval mode on `device`, with its class names, from a checkpoint written by train.py, a
    checkpoint of tools/convert_torchvision.py, or a bare state dict: its path, or its contents where the caller has
    read it already. `changes` are settings to run it with instead of the checkpoint's, as model_from_checkpoint
    takes them (e.g. score_threshold, min_size)."""
    checkpoint = read_checkpoint(path) if isinstance(path, str) else path
    model = model_from_checkpoint(checkpoint, **changes)
    class_names = checkpoint.get("class_names") or [str(label) for label in range(model.num_classes)]
    return LoadedModel(model.to(device).eval(), list(class_names))
