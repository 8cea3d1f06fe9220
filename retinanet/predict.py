"""Batched inference over a dataset. The paper's §4 "Inference" post-processing (the top 1k candidates per level
above 0.05, merged across levels, NMS at 0.5) happens in the model; this maps its detections from the resized,
padded input back to the pixels of the original image files, where the annotations live.

Legend for shapes: B batch, D detections of one image.
"""

from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.ops import clip_boxes_to_image
from tqdm import tqdm

from .dataloader import AspectRatioBatchSampler, DetectionDataset, collate
from .runtime import resolve_device
from .transforms import DetectionTransform, build_transform

DEFAULT_IMAGE_SIZE = (800, 1333)  # (min_size, max_size) for a model that does not say what it was trained at


def to_original_pixels(
    detection: dict[str, torch.Tensor], scale: float, original_size: tuple[int, int]
) -> dict[str, np.ndarray]:
    """One image's detections in the pixels of its image file: boxes divided by the resize scale and clipped to
    the original (height, width). Returns numpy arrays boxes (D, 4), scores (D,), labels (D,)."""
    boxes = detection["boxes"].detach().float().cpu() / scale  # (D, 4)
    boxes = clip_boxes_to_image(boxes, tuple(original_size))
    return {
        "boxes": boxes.numpy(),
        "scores": detection["scores"].detach().float().cpu().numpy(),
        "labels": detection["labels"].detach().cpu().long().numpy(),
    }


def predict_dataset(
    model: nn.Module,
    dataset: DetectionDataset,
    batch_size: int = 8,
    workers: int = 0,
    device: str | torch.device | None = None,
) -> list[dict[str, np.ndarray]]:
    """Detect objects in every image of `dataset` with `model` (in eval mode), `batch_size` images at a time.

    Batches hold images of one orientation (landscape or portrait), so that little of a padded batch is padding;
    the result is in dataset order all the same. `device` defaults to the device of the model's parameters.
    Returns, per dataset index, {"boxes": (D, 4) x1, y1, x2, y2 in original image pixels, "scores": (D,),
    "labels": (D,) class index}.
    """
    if model.training:
        raise ValueError("predict_dataset needs the model in eval mode: call model.eval() first")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    aspect_ratios = [dataset.aspect_ratio(index) for index in range(len(dataset))]
    batches = AspectRatioBatchSampler(aspect_ratios, batch_size, shuffle=False)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    predictions: list[dict[str, np.ndarray] | None] = [None] * len(dataset)
    with torch.inference_mode(), tqdm(total=len(dataset), desc="detecting", unit="image") as progress:
        for batch in loader:
            detections = model(batch["images"].to(device, non_blocking=True))  # B dicts, boxes in input pixels
            for detection, scale, index, original_size in zip(
                detections, batch["scales"].tolist(), batch["indices"], batch["original_sizes"]
            ):
                predictions[index] = to_original_pixels(detection, scale, original_size)
            progress.update(len(batch["indices"]))
    return predictions


def check_class_names(model_class_names: list[str], dataset_class_names: list[str]) -> None:
    """Raise ValueError unless a model's classes can be the dataset's: labels are indices, so both lists must
    match in length and order. Unnamed classes ("0", "1", ..., from a bare state dict) are matched by count."""
    if len(model_class_names) != len(dataset_class_names):
        raise ValueError(f"the model detects {len(model_class_names)} classes but the dataset has "
                         f"{len(dataset_class_names)}; evaluate with the class list the model was trained on")
    unnamed = [str(label) for label in range(len(model_class_names))]
    if list(model_class_names) not in (unnamed, list(dataset_class_names)):
        mismatches = [(label, model_name, dataset_name) for label, (model_name, dataset_name)
                      in enumerate(zip(model_class_names, dataset_class_names)) if model_name != dataset_name]
        raise ValueError(f"the model's class names differ from the dataset's (label, model, dataset): "
                         f"{mismatches[:5]}; labels are indices, so both class lists must be in the same order")


class Inference(NamedTuple):
    """What running a trained model needs: the model in eval mode, its class names, its device, and the
    evaluation transform (resize as in training, then normalise)."""

    model: nn.Module
    class_names: list[str]
    device: torch.device
    transform: DetectionTransform


def load_for_inference(
    model_path: str, device: str | None = None, min_size: int | None = None, max_size: int | None = None
) -> Inference:
    """The model of the checkpoint at `model_path` on `device` (a name as for resolve_device; None: CUDA when
    available), with the images resized as in training unless min_size or max_size say otherwise."""
    from .checkpoint import load_model  # the model code only here: the metrics need none

    device = resolve_device(device)
    model, class_names, trained_size = load_model(model_path, device)
    trained_min_size, trained_max_size = trained_size or DEFAULT_IMAGE_SIZE
    transform = build_transform(False, min_size or trained_min_size, max_size or trained_max_size)
    return Inference(model, class_names, device, transform)
