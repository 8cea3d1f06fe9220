"""Box coding: regression targets relative to anchors (paper §4 "Box Regression Subnet": the box parameterisation
of R-CNN, which the paper cites and does not repeat).

The box regression subnet predicts, for each anchor, the offset (dx, dy, dw, dh) from the anchor to its matched
ground-truth box, in R-CNN's parameterisation:

    dx = (gx - ax) / aw,   dy = (gy - ay) / ah,   dw = log(gw / aw),   dh = log(gh / ah)

with (ax, ay, aw, ah) the anchor's centre and size and (gx, gy, gw, gh) the box's. Implementations may divide each
offset by a fixed standard deviation (`std`): Detectron's RetinaNet, the authors' code, uses the raw deltas
(std 1, 1, 1, 1), as do detectron2 and torchvision; yhenon/pytorch-retinanet divides by (0.1, 0.1, 0.2, 0.2),
which Detectron uses for its Fast R-CNN head. The model's settings say which (settings.BOX_CODINGS).
"""

import math

import torch

# Largest dw/dh that decoding lets through exp(): a box at most 1000/16 times its anchor, as in Detectron.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def centre_size(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split (..., 4) x1y1x2y2 boxes into centre x, centre y, width and height, each (...)."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def encode(anchors: torch.Tensor, boxes: torch.Tensor, std: tuple[float, ...]) -> torch.Tensor:
    """Regression targets (..., 4) that move `anchors` (..., 4) onto `boxes` (..., 4), both x1y1x2y2, each offset
    divided by its `std`. The std are Python numbers, so no tensor is copied to the device."""
    ax, ay, aw, ah = centre_size(anchors)
    gx, gy, gw, gh = centre_size(boxes)
    return torch.stack(
        [(gx - ax) / (aw * std[0]), (gy - ay) / (ah * std[1]), torch.log(gw / aw) / std[2],
         torch.log(gh / ah) / std[3]], dim=-1
    )  # (..., 4)


def decode(
    anchors: torch.Tensor, deltas: torch.Tensor, std: tuple[float, ...], max_log_scale: float = MAX_LOG_SCALE
) -> torch.Tensor:
    """Boxes (..., 4) x1y1x2y2 obtained by applying `deltas` (..., 4) to `anchors` (..., 4); inverse of encode.

    dw and dh are clamped to `max_log_scale` so that an untrained network cannot overflow exp().
    """
    ax, ay, aw, ah = centre_size(anchors)
    dx, dy, dw, dh = deltas.unbind(dim=-1)
    cx = ax + dx * std[0] * aw
    cy = ay + dy * std[1] * ah
    w = aw * torch.exp((dw * std[2]).clamp(max=max_log_scale))
    h = ah * torch.exp((dh * std[3]).clamp(max=max_log_scale))
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)  # (..., 4)


def clip_boxes(boxes: torch.Tensor, height, width) -> torch.Tensor:
    """(..., 4) x1y1x2y2 boxes clipped to an image of `height` x `width` pixels: numbers, or tensors that broadcast
    with boxes[..., 0] (one size per image of a batch, say (B, 1) for (B, C, 4) boxes)."""
    heights = torch.as_tensor(height, dtype=boxes.dtype, device=boxes.device)
    widths = torch.as_tensor(width, dtype=boxes.dtype, device=boxes.device)
    xs = torch.minimum(boxes[..., 0::2].clamp(min=0), widths[..., None])  # (..., 2): x1, x2
    ys = torch.minimum(boxes[..., 1::2].clamp(min=0), heights[..., None])  # (..., 2): y1, y2
    return torch.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], dim=-1)  # (..., 4)


def has_area(boxes: torch.Tensor) -> torch.Tensor:
    """(...) whether each of the (..., 4) x1y1x2y2 boxes has some area."""
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def batched_box_iou(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """IoU of each of the (B, G, 4) boxes of B images with each of the (R, 4) anchors: (B, G, R). As torchvision's
    box_iou for one image, with every intermediate of the output's size (no (B, G, R, 2) corner tensors)."""
    box_areas = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # (B, G)
    anchor_areas = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])  # (R,)
    x1, y1, x2, y2 = (boxes[..., i, None] for i in range(4))  # each (B, G, 1)
    widths = (torch.minimum(x2, anchors[:, 2]) - torch.maximum(x1, anchors[:, 0])).clamp(min=0)  # (B, G, R)
    heights = (torch.minimum(y2, anchors[:, 3]) - torch.maximum(y1, anchors[:, 1])).clamp(min=0)  # (B, G, R)
    intersection = widths * heights
    return intersection / (box_areas[..., None] + anchor_areas - intersection)  # (B, G, 1) + (R,) -> (B, G, R)
