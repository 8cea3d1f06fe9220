"""Inference (paper §4.1 "Inference and Training", paragraph "Inference"): from the network's outputs to detections.

"To improve speed, we only decode box predictions from at most 1k top-scoring predictions per FPN level, after
thresholding detector confidence at 0.05. The top predictions from all levels are merged and non-maximum
suppression with a threshold of 0.5 is applied to yield the final detections."

The whole batch is processed at once, and the candidates are at most 1k per level and image, so that NMS has bounded
work for any model state. Taking the top 1k before the threshold keeps exactly the predictions the paper's order
keeps: those above the threshold among the 1k best are the (at most 1k) best of those above it.

Where the paper is silent: NMS runs per class (Detectron's, detectron2's and torchvision's choice); the threshold is
0.05 on every level, where Detectron uses 0.0 on P7.

`predict` runs a model over the batches of a loader (dataloader.inference_loader) and gives each image's detections
in the pixels of its image file, where the annotations live.

Legend for shapes: B batch, R anchors over all levels, K classes, C candidates per image (at most 1k per level),
D candidates of the whole batch above the threshold (or detections of one image).
"""

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.ops import batched_nms, nms

from .anchors import clip_boxes, decode, has_area
from .settings import ModelSettings


def top_candidates(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor, k: int,
                   std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k best (anchor, class) pairs of a level: decoded boxes (B, k, 4), scores (B, k), labels (B, k)."""
    num_classes = logits.shape[-1]
    scores = torch.sigmoid(logits.float()).flatten(1)  # (B, R_l, K) -> (B, R_l*K)
    scores, flat_index = scores.topk(min(k, scores.shape[1]), dim=1)  # (B, k)
    anchor_index = flat_index // num_classes  # (B, k)
    labels = flat_index % num_classes  # (B, k)
    deltas = torch.gather(deltas.float(), 1, anchor_index[..., None].expand(-1, -1, 4))  # (B, k, 4)
    return decode(anchors[anchor_index], deltas, std), scores, labels


def nms_within_groups(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                      threshold: float) -> torch.Tensor:
    """Indices of the (D, 4) boxes NMS keeps, by score, boxes of other groups (image, class) never suppressing."""
    # One call makes a GPU's host wait once per batch; on the CPU, where nothing waits, a call per group is cheaper.
    if boxes.device.type == "cpu":
        return batched_nms(boxes.double(), scores.double(), groups, threshold)
    return nms_in_one_call(boxes, scores, groups, threshold)


def nms_in_one_call(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                    threshold: float) -> torch.Tensor:
    """nms_within_groups with one NMS call: each group is moved to a region of the plane of its own, as
    torchvision's batched_nms does for classes. In float64, so that the shift leaves coordinates exact."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    boxes = boxes.double()
    shift = groups.double() * (boxes.max() + 1)  # (D,)
    return nms(boxes + shift[:, None], scores.double(), threshold)


def split_into_images(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, image_index: torch.Tensor,
                      batch_size: int, max_detections: int) -> list[dict[str, torch.Tensor]]:
    """The batch's (D, ...) detections, by score, as B dicts of at most max_detections each."""
    order = torch.sort(image_index, stable=True).indices  # by image, by decreasing score within each image
    counts = torch.bincount(image_index, minlength=batch_size).tolist()  # detections per image, on the host
    return [{"boxes": image_boxes[:max_detections], "scores": image_scores[:max_detections],
             "labels": image_labels[:max_detections]} for image_boxes, image_scores, image_labels
            in zip(boxes[order].split(counts), scores[order].split(counts), labels[order].split(counts))]


def detect(cls_logits: torch.Tensor, box_deltas: torch.Tensor, anchors: torch.Tensor, anchors_per_level: list[int],
           image_sizes: torch.Tensor, settings: ModelSettings) -> list[dict[str, torch.Tensor]]:
    """B dicts {"boxes": (D_i, 4) x1y1x2y2 in input pixels, "scores", "labels"}, by decreasing score, of (B, R, K)
    logits, (B, R, 4) deltas, the (R, 4) anchors (in levels of anchors_per_level) and (B, 2) image_sizes."""
    levels = zip(cls_logits.split(anchors_per_level, dim=1), box_deltas.split(anchors_per_level, dim=1),
                 anchors.split(anchors_per_level))  # per level: (B, R_l, K), (B, R_l, 4), (R_l, 4)
    candidates = [top_candidates(*level, settings.topk_candidates, settings.box_coder_std) for level in levels]
    boxes, scores, labels = (torch.cat(parts, dim=1) for parts in zip(*candidates))  # (B, C, 4), (B, C), (B, C)
    # Each image's own (height, width): no box, nor part of one, in the padding of an image smaller than the batch
    boxes = clip_boxes(boxes, image_sizes[:, 0, None], image_sizes[:, 1, None])  # (B, C, 4), sizes (B, 1)
    confident = (scores > settings.score_threshold) & has_area(boxes)  # (B, C)
    image_index, candidate = confident.nonzero(as_tuple=True)  # (D,) each
    boxes, scores, labels = (values[image_index, candidate] for values in (boxes, scores, labels))  # (D, ...)
    groups = image_index * cls_logits.shape[-1] + labels  # (D,): one group per image and class
    kept = nms_within_groups(boxes, scores, groups, settings.nms_threshold)  # by decreasing score
    return split_into_images(boxes[kept], scores[kept], labels[kept], image_index[kept], cls_logits.shape[0],
                             settings.max_detections)


# ---------------------------------------------------------------------------------------- over a dataset


def inference_autocast(device: torch.device) -> torch.autocast:
    """Mixed precision for inference: fp16 on a GPU (the scores and boxes are decoded in fp32), none elsewhere."""
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


def detections_to_host(detections: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """A batch's detections on the host, copied in one piece: one wait for the device a batch."""
    counts = [len(detection["scores"]) for detection in detections]
    rows = torch.cat([torch.cat([detection["boxes"].float(), detection["scores"][:, None].float(),
                                 detection["labels"][:, None].float()], dim=1)
                      for detection in detections]).cpu()  # B x (D_i, 6) -> (D, 6): one copy
    return [{"boxes": part[:, :4], "scores": part[:, 4], "labels": part[:, 5].long()} for part in rows.split(counts)]


def to_original_pixels(detection: dict[str, torch.Tensor], scale: float,
                       original_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """One image's detections (on the host) in the pixels of its image file, with that file's size."""
    boxes = clip_boxes(detection["boxes"] / scale, *original_size)  # (D, 4)
    return {"boxes": boxes.numpy(), "scores": detection["scores"].numpy(), "labels": detection["labels"].numpy(),
            "image_size": tuple(original_size)}


def predict(model: nn.Module, loader: DataLoader) -> Iterator[tuple[int, dict[str, np.ndarray] | None]]:
    """(dataset index, to_original_pixels' dict) for each image of `loader`'s batches (dataloader.py's items), by
    `model` in eval mode on its device; None for an image that could not be decoded (original_size (0, 0))."""
    if model.training:
        raise ValueError("predict needs the model in eval mode: call model.eval() first")
    device = next(model.parameters()).device
    with torch.inference_mode():
        for batch in loader:
            images = batch["images"].to(device, non_blocking=True, memory_format=torch.channels_last)  # as the weights
            with inference_autocast(device):
                detections = model(images, image_sizes=batch["image_sizes"])  # B dicts, boxes in input pixels
            for detection, scale, index, size in zip(detections_to_host(detections), batch["scales"].tolist(),
                                                     batch["indices"], batch["original_sizes"]):
                yield index, to_original_pixels(detection, scale, size) if size != (0, 0) else None


def cap_report(predictions: list[dict[str, np.ndarray]], max_detections: int) -> str:
    """A line saying how many images reached the cap of detections an image, and may have lost boxes past it."""
    capped = sum(len(prediction["scores"]) >= max_detections for prediction in predictions)
    if not capped:
        return f"no image reached the cap of {max_detections} detections"
    return (f"{capped} of {len(predictions)} images reached the cap of {max_detections} detections an image and may "
            f"have lost boxes past it: raise it with --max_detections")
