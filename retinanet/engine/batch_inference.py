"""Batched inference over a dataset: a model's detections (its §4.1 "Inference" rule, in the model) mapped from the
resized, padded input back to the pixels of the original image files, where the annotations live. Under
distributed training, each process predicts its share of the images and the first gathers them all.

Legend for shapes: B batch, D detections of one image.
"""

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..boxes import clip_boxes
from ..dataloader import AspectRatioBatchSampler, DetectionDataset, aspect_ratios, collate
from .runtime import inference_autocast


def detections_to_host(detections: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """A batch's detections (boxes (D_i, 4), scores and labels (D_i,) per image, on any device) on the host, copied
    in one piece: the device is waited for once per batch, not three times per image."""
    counts = [len(detection["scores"]) for detection in detections]
    rows = torch.cat([torch.cat([detection["boxes"].float(), detection["scores"][:, None].float(),
                                 detection["labels"][:, None].float()], dim=1)
                      for detection in detections]).cpu()  # B x (D_i, 6) -> (D, 6): one copy
    return [{"boxes": part[:, :4], "scores": part[:, 4], "labels": part[:, 5].long()} for part in rows.split(counts)]


def to_original_pixels(
    detection: dict[str, torch.Tensor], scale: float, original_size: tuple[int, int]
) -> dict[str, np.ndarray]:
    """One image's detections on the host (as detections_to_host gives them) in the pixels of its image file: boxes
    divided by the resize scale and clipped to the original (height, width). Returns numpy arrays boxes (D, 4),
    scores (D,), labels (D,), and the image_size (height, width) of the file."""
    boxes = clip_boxes(detection["boxes"] / scale, *original_size)  # (D, 4)
    return {
        "boxes": boxes.numpy(),
        "scores": detection["scores"].numpy(),
        "labels": detection["labels"].numpy(),
        "image_size": tuple(original_size),
    }


def cap_report(predictions: list[dict[str, np.ndarray]], max_detections: int) -> str | None:
    """A line saying how many images reached the cap of detections, whose boxes past it were dropped; None if none
    did."""
    capped = sum(len(prediction["scores"]) >= max_detections for prediction in predictions)
    if not capped:
        return None
    return (f"{capped} of {len(predictions)} images reached the cap of {max_detections} detections an image and may "
            f"have lost boxes past it: raise it with --max_detections")


def say_if_capped(predictions: list[dict[str, np.ndarray]], max_detections: int) -> None:
    """Print cap_report's line, if any image reached the cap."""
    report = cap_report(predictions, max_detections)
    if report:
        print(report)


def predict_dataset(
    model: nn.Module,
    dataset: DetectionDataset,
    batch_size: int = 8,
    workers: int = 0,
    device: str | torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> list[dict[str, np.ndarray] | None]:
    """Detect objects in every image of `dataset` with `model` (in eval mode), `batch_size` images at a time.

    Batches hold images of one orientation (landscape or portrait), so that little of a padded batch is padding;
    the result is in dataset order all the same. `device` defaults to the device of the model's parameters.
    Returns, per dataset index, {"boxes": (D, 4) x1, y1, x2, y2 in original image pixels, "scores": (D,),
    "labels": (D,) class index, "image_size": (height, width)}. With world_size > 1, this process (`rank`)
    detects on its share of the batches only, and the other entries are None: see gather_predictions.
    """
    if model.training:
        raise ValueError("predict_dataset needs the model in eval mode: call model.eval() first")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    batches = AspectRatioBatchSampler(aspect_ratios(dataset), batch_size, shuffle=False, num_replicas=world_size,
                                      rank=rank)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    predictions: list[dict[str, np.ndarray] | None] = [None] * len(dataset)
    progress = tqdm(total=len(dataset), desc="detecting", unit="image", disable=rank != 0)
    with torch.inference_mode(), progress:
        for batch in loader:
            images = batch["images"].to(device, non_blocking=True, memory_format=torch.channels_last)  # as the weights
            with inference_autocast(device):
                detections = model(images, image_sizes=batch["image_sizes"])  # B dicts, boxes in input pixels
            for detection, scale, index, original_size in zip(
                detections_to_host(detections), batch["scales"].tolist(), batch["indices"], batch["original_sizes"]
            ):
                predictions[index] = to_original_pixels(detection, scale, original_size)
            progress.update(len(batch["indices"]) * world_size)
    return predictions


def gather_predictions(predictions: list[dict | None], rank: int, world_size: int) -> list[dict] | None:
    """Every process's predictions (from predict_dataset with that rank), merged into one list on rank 0; None on
    the other ranks. Every process must call it."""
    if world_size == 1:
        return predictions
    gathered = [None] * world_size if rank == 0 else None
    dist.gather_object(predictions, gathered, dst=0)
    if rank != 0:
        return None
    return [next(shard[index] for shard in gathered if shard[index] is not None) for index in range(len(predictions))]


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
