"""Inference (paper §4.1 "Inference and Training", paragraph "Inference"): from the network's outputs to detections.

"To improve speed, we only decode box predictions from at most 1k top-scoring predictions per FPN level, after
thresholding detector confidence at 0.05. The top predictions from all levels are merged and non-maximum
suppression with a threshold of 0.5 is applied to yield the final detections."

The whole batch is processed at once, and the candidates are at most 1k per level and image, so that NMS has bounded
work for any model state. Taking the top 1k before the threshold keeps exactly the predictions the paper's order
keeps: those above the threshold among the 1k best are the (at most 1k) best of those above it.

Where the paper is silent: NMS runs per class (Detectron's, detectron2's and torchvision's choice); the threshold is
0.05 on every level, where Detectron uses 0.0 on P7.

Legend for shapes: B batch, R anchors over all levels, K classes, C candidates per image (at most 1k per level),
D candidates of the whole batch above the threshold.
"""

import torch
from torchvision.ops import batched_nms, nms

from .boxes import clip_boxes, decode, has_area
from .settings import ModelSettings


def top_candidates(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor, k: int,
                   std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k best (anchor, class) pairs of one level in each image, from (B, R_l, K) logits, (B, R_l, 4) deltas and
    (R_l, 4) anchors: decoded boxes (B, k, 4), scores (B, k) and labels (B, k)."""
    num_classes = logits.shape[-1]
    scores = torch.sigmoid(logits.float()).flatten(1)  # (B, R_l, K) -> (B, R_l*K)
    scores, flat_index = scores.topk(min(k, scores.shape[1]), dim=1)  # (B, k)
    anchor_index = flat_index // num_classes  # (B, k)
    labels = flat_index % num_classes  # (B, k)
    deltas = torch.gather(deltas.float(), 1, anchor_index[..., None].expand(-1, -1, 4))  # (B, k, 4)
    return decode(anchors[anchor_index], deltas, std), scores, labels


def nms_within_groups(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                      threshold: float) -> torch.Tensor:
    """Indices of the (D, 4) boxes that NMS keeps, by decreasing score, where boxes of different groups (one per
    image and class) never suppress each other."""
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
    """The batch's (D, ...) detections, by decreasing score, with the image each belongs to, as B dicts of at most
    max_detections each, in the same order."""
    order = torch.sort(image_index, stable=True).indices  # by image, by decreasing score within each image
    counts = torch.bincount(image_index, minlength=batch_size).tolist()  # detections per image, on the host
    return [
        {"boxes": image_boxes[:max_detections], "scores": image_scores[:max_detections],
         "labels": image_labels[:max_detections]}
        for image_boxes, image_scores, image_labels in zip(
            boxes[order].split(counts), scores[order].split(counts), labels[order].split(counts)
        )
    ]


def detect(
    cls_logits: torch.Tensor,
    box_deltas: torch.Tensor,
    anchors: torch.Tensor,
    anchors_per_level: list[int],
    image_sizes: torch.Tensor,
    settings: ModelSettings,
) -> list[dict[str, torch.Tensor]]:
    """Detections of a batch from its (B, R, K) class logits and (B, R, 4) box deltas, the (R, 4) anchors (split
    into levels by `anchors_per_level`) and each image's (height, width) in `image_sizes` (B, 2). Returns B dicts
    {"boxes": (D_i, 4) x1y1x2y2 in input pixels, "scores": (D_i,), "labels": (D_i,) int64}, by decreasing score."""
    levels = zip(cls_logits.split(anchors_per_level, dim=1), box_deltas.split(anchors_per_level, dim=1),
                 anchors.split(anchors_per_level))  # per level: (B, R_l, K), (B, R_l, 4), (R_l, 4)
    candidates = [top_candidates(*level, settings.topk_candidates, settings.box_coder_std) for level in levels]
    boxes, scores, labels = (torch.cat(parts, dim=1) for parts in zip(*candidates))  # (B, C, 4), (B, C), (B, C)
    # Each image's own (height, width): an image smaller than the padded batch keeps no box, nor part of one, in its
    # padding.
    boxes = clip_boxes(boxes, image_sizes[:, 0, None], image_sizes[:, 1, None])  # (B, C, 4), sizes (B, 1)
    confident = (scores > settings.score_threshold) & has_area(boxes)  # (B, C)
    image_index, candidate = confident.nonzero(as_tuple=True)  # (D,) each
    boxes, scores, labels = (values[image_index, candidate] for values in (boxes, scores, labels))  # (D, ...)
    groups = image_index * cls_logits.shape[-1] + labels  # (D,): one group per image and class
    kept = nms_within_groups(boxes, scores, groups, settings.nms_threshold)  # by decreasing score
    return split_into_images(boxes[kept], scores[kept], labels[kept], image_index[kept], cls_logits.shape[0],
                             settings.max_detections)
