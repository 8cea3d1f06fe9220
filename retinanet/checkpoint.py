"""Models in and out of files: the one way to build a RetinaNet and the one way to load a trained one, and checkpoints,
plain dicts of tensors and primitives written atomically and read with weights_only=True.

    model = build_model(ModelSettings(num_classes=80, **initial_freezing(True)), pretrained=True)
    model, class_names = load_model("output/best.pt")

build_model starts the backbone from torchvision's ImageNet weights or from scratch (paper §4.1 "Initialization":
"The base ResNet-50 and ResNet-101 models are pre-trained on ImageNet1k"). A checkpoint of train.py holds "model"
(the state dict), "model_settings" (its recipe, settings.ModelSettings), "class_names" and the training state
("optimizer", "scheduler", "scaler", "iteration", "rng_state", "args", ...); load_model rebuilds exactly the model
that was trained from its settings. A bare state dict, such as the COCO weights yhenon/pytorch-retinanet publishes,
is read as one of yhenon's models (extras/interop.py).
"""

import os
import pickle
import random
import re
import urllib.error
from typing import NamedTuple

import numpy as np
import torch
import torchvision

from .dataloader import write_atomically
from .model import ResNet, RetinaNet
from .settings import ModelSettings

CLASSIFICATION_OUTPUT = "classification_subnet.output."  # the layer fine-tuning on new classes starts afresh
SHAPE_SETTINGS = ("depth", "p6_from", "num_anchors")  # change the tensors' shapes: fixed by the weights


class WeightsUnavailableError(ValueError):
    """Pretrained weights could not be downloaded or found; the message says how to proceed."""


# ------------------------------------------------------------------------------------------------- files


def save_checkpoint(checkpoint: dict, path: str) -> None:
    """Write `checkpoint` to `path` atomically, making its folder if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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


# -------------------------------------------------------------------------------------------------- models


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
    """A new RetinaNet of `settings`, its backbone from ImageNet weights (torchvision's, or a path) or not."""
    model = RetinaNet(settings)
    if pretrained is not False:
        load_backbone_weights(model.backbone, imagenet_state_dict(settings.depth, pretrained))
    return model


def as_checkpoint(checkpoint: dict) -> dict:
    """A checkpoint of this project as it is; a bare state dict (yhenon's) as one (extras/interop.py)."""
    if "model_settings" in checkpoint:
        return checkpoint
    from .extras.interop import yhenon_checkpoint  # only for such files

    return yhenon_checkpoint(checkpoint)


def checkpoint_settings(checkpoint: dict) -> ModelSettings:
    """The recipe of the model in a checkpoint (or a bare state dict)."""
    return ModelSettings(**as_checkpoint(checkpoint)["model_settings"])


def resumed_settings(checkpoint: dict, path: str, asked: dict) -> dict:
    """The settings of a run resumed from `checkpoint` (read from `path`): the checkpoint's own; a ValueError says
    which of the settings `asked` for (those a user typed) differ, and how to go on."""
    settings = checkpoint_settings(checkpoint).as_dict()
    differences = [f"{name} {settings[name]} (asked for: {value})" for name, value in asked.items()
                   if settings[name] != value]
    if differences:
        raise ValueError(f"{path}: the run was trained with {'; '.join(differences)}. A resumed run keeps the settings "
                         f"of its model: leave those flags out, or start a new run from this checkpoint with --fine_tune.")
    return settings


class LoadedModel(NamedTuple):
    """A trained model and its class names (index = label); its settings say everything else."""

    model: RetinaNet
    class_names: list[str]


def load_model(checkpoint: str | dict, device: str | torch.device = "cpu", num_classes: int | None = None,
               **changes) -> LoadedModel:
    """The model of a checkpoint (its path, or its contents) in eval mode on `device`, with its class names.

    `changes` are settings to run it with instead of the checkpoint's (image sizes, thresholds, freezing, ...);
    those that fix tensor shapes (SHAPE_SETTINGS) cannot change. With another `num_classes` (fine-tuning on other
    classes), every weight but the classification output layer is loaded; that layer starts afresh, with the
    prior's bias (§4.1 "Initialization"), and the class names are "0", "1", ... until the caller names them.
    """
    checkpoint = as_checkpoint(read_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint)
    settings = ModelSettings(**checkpoint["model_settings"])
    new_settings = settings.replace(num_classes=num_classes or settings.num_classes, **changes)
    fixed = [f"{name} {getattr(settings, name)} (not {getattr(new_settings, name)})" for name in SHAPE_SETTINGS
             if getattr(new_settings, name) != getattr(settings, name)]
    if fixed:
        raise ValueError(f"the checkpoint's weights fix {', '.join(fixed)}")
    model = RetinaNet(new_settings)
    state_dict = checkpoint["model"]
    class_names = list(checkpoint.get("class_names") or map(str, range(settings.num_classes)))
    if new_settings.num_classes != settings.num_classes:
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith(CLASSIFICATION_OUTPUT)}
        state_dict |= {key: value for key, value in model.state_dict().items() if key.startswith(CLASSIFICATION_OUTPUT)}
        class_names = [str(label) for label in range(new_settings.num_classes)]
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ValueError(f"the checkpoint's weights do not fit its settings: {str(error).splitlines()[1]}") from error
    return LoadedModel(model.to(device).eval(), class_names)


# ---------------------------------------------------------------------------------------- training state


def random_state() -> dict:
    """The state of every random number generator of this process, as a checkpoint can hold it."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": [name, keys.tolist(), position, has_gauss, cached_gaussian]}


def restore_random_state(state: dict) -> None:
    """Put every random number generator back in the state random_state() returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    random.setstate(state["python"])


def training_state(model: RetinaNet, optimizer, scheduler, scaler, **progress) -> dict:
    """A training run's checkpoint: all a resumed run needs to go on as if never stopped, and `progress`."""
    return {
        "model": model.state_dict(), "model_settings": model.settings.as_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng_state": random_state(),
        "loss_normalizer_ema": float(model.foreground_ema), **progress,
    }


def restore_training_state(checkpoint: dict, path: str, model: RetinaNet, optimizer, scheduler, scaler) -> dict:
    """Put the model (rebuilt from the checkpoint's settings), optimizer, schedule, grad scaler, random state and
    loss normaliser back as training_state saved them; returns the run's progress: iteration, best_map and
    skipped_batches."""
    if "optimizer" not in checkpoint:
        raise ValueError(f"{path}: holds no training state (a converted or bare model); use --fine_tune to start "
                         f"from it")
    trained = checkpoint_settings(checkpoint)
    if trained.num_classes != model.num_classes:
        raise ValueError(f"{path}: holds a ResNet-{trained.depth} RetinaNet for {trained.num_classes} classes, but this "
                         f"run's data has {model.num_classes}. Resume with the run's own data, or start from it with "
                         f"--fine_tune to train it on other classes.")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    model.foreground_ema.fill_(checkpoint["loss_normalizer_ema"])
    restore_random_state(checkpoint["rng_state"])
    return {name: checkpoint[name] for name in ("iteration", "best_map", "skipped_batches")}
