"""Checkpoints: plain dicts of tensors and primitives, written atomically and read with weights_only=True.

A checkpoint written by train.py holds "model" (the state dict), "optimizer", "scheduler", "scaler",
"epoch", "iteration", "class_names", "model_settings" (RetinaNet's constructor arguments) and "args". A bare
state dict, such as the COCO weights yhenon/pytorch-retinanet publishes, is accepted wherever a model is read:
its depth and class count are inferred from the tensors' shapes.
"""

import os
import pickle
import re
from typing import NamedTuple

import torch

from .files import write_atomically
from .model import RESNET_LAYOUTS, RetinaNet

WRAPPER_PREFIX = "module."  # what (Distributed)DataParallel adds to every key of the model it wraps


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
    """The model's state dict in a train.py checkpoint, or the checkpoint itself if it is a bare state dict.

    Keys saved from a DataParallel or DistributedDataParallel wrapper ("module.conv1.weight") lose the prefix.
    """
    state_dict = checkpoint["model"] if "model" in checkpoint else checkpoint
    if state_dict and all(key.startswith(WRAPPER_PREFIX) for key in state_dict):
        return {key[len(WRAPPER_PREFIX):]: value for key, value in state_dict.items()}
    return state_dict


def infer_architecture(state_dict: dict[str, torch.Tensor], num_anchors: int = 9) -> tuple[int, int]:
    """(depth, num_classes) of a RetinaNet state dict, from the number and kind of residual blocks."""
    if "classificationModel.output.weight" not in state_dict:
        raise ValueError("not a RetinaNet state dict: it has no 'classificationModel.output.weight'")
    num_classes = state_dict["classificationModel.output.weight"].shape[0] // num_anchors
    blocks = tuple(
        len({key.split(".")[1] for key in state_dict if key.startswith(f"layer{stage}.")}) for stage in range(1, 5)
    )
    bottleneck = "layer1.0.conv3.weight" in state_dict
    for depth, (block, layout) in RESNET_LAYOUTS.items():
        if layout == blocks and (block.expansion == 4) == bottleneck:
            return depth, num_classes
    raise ValueError(f"not a ResNet backbone of a known depth: blocks per stage {blocks}")


def build_from_checkpoint(checkpoint: dict) -> RetinaNet:
    """A RetinaNet with the checkpoint's architecture and settings, its weights loaded."""
    state_dict = model_state_dict(checkpoint)
    depth, num_classes = infer_architecture(state_dict)
    settings = dict(checkpoint.get("model_settings", {}), depth=depth, num_classes=num_classes)
    model = RetinaNet(**settings)
    model.load_state_dict(state_dict)
    return model


class LoadedModel(NamedTuple):
    """A ready model, its class names (index = label) and the (min_size, max_size) resize it was trained with
    (None for a bare state dict, which does not say)."""

    model: RetinaNet
    class_names: list[str]
    image_size: tuple[int, int] | None


def load_model(path: str, device: str | torch.device = "cpu") -> LoadedModel:
    """A RetinaNet in eval mode on `device`, with its class names and training image size, from a checkpoint
    written by train.py or a bare state dict."""
    checkpoint = read_checkpoint(path)
    model = build_from_checkpoint(checkpoint)
    class_names = checkpoint.get("class_names") or [str(label) for label in range(model.num_classes)]
    train_args = checkpoint.get("args", {})
    image_size = (train_args["min_size"], train_args["max_size"]) if "min_size" in train_args else None
    return LoadedModel(model.to(device).eval(), list(class_names), image_size)
