"""Anchors over the feature pyramid (paper §4 "RetinaNet Detector", paragraph "Anchors"), and boxes relative to them
(paragraph "Box Regression Subnet": the box parameterisation of R-CNN, which the paper cites and does not repeat).

"The anchors have areas of 32² to 512² on pyramid levels P3 to P7, respectively. [...] at each pyramid level
we use anchors at three aspect ratios {1:2, 1:1, 2:1} [...] we add anchors of sizes {2^0, 2^(1/3), 2^(2/3)} of
the original set of 3 aspect ratio anchors. [...] In total there are A = 9 anchors per level."

The sizes, scales and ratios are model settings (settings.py), the paper's by default; any number of scales and
ratios gives A = scales x ratios. Order of the R anchors of an image: level P3 -> P7, then row-major location
(y, then x), then the A anchors (aspect ratio major, scale minor, as torchvision; Detectron and detectron2 order
them scale major). The subnets flatten their outputs in exactly this order.

Sides are exact here: the P3 anchor of ratio 1:2 is 45.25 x 22.63 pixels, width by height (32·√2 by 32/√2).
Detectron rounds the sides of its stride-sized base anchor before scaling it (11 x 6 at stride 8, times 4), making
it 44 x 24.

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
from torch import nn

from .settings import PYRAMID_LEVELS, ModelSettings


def base_anchors(size: float, aspect_ratios, scales, integer: bool = False) -> torch.Tensor:
    """The A = len(aspect_ratios) * len(scales) anchors of one level centred on (0, 0): (A, 4) x1y1x2y2, float64.
    Scale s and aspect ratio r (height / width): area (s * size)², width sqrt(area / r). With `integer`, as
    torchvision: the sides s * size truncated to integers (32, 40, 50 on P3), the corners rounded."""
    sides = torch.tensor([int(size * scale) if integer else size * scale for scale in scales], dtype=torch.float64)
    ratios = torch.tensor(aspect_ratios, dtype=torch.float64)
    widths = (sides[None, :] / torch.sqrt(ratios[:, None])).reshape(-1)  # (A,), ratio major, scale minor
    heights = (sides[None, :] * torch.sqrt(ratios[:, None])).reshape(-1)  # (A,)
    anchors = torch.stack([-widths, -heights, widths, heights], dim=1) / 2  # (A, 4)
    return anchors.round() if integer else anchors


def grid_size(image_size: int, stride: int) -> int:
    """Feature map size at a stride: every stride-2 conv of the ResNet rounds up, so it is ceil(size / stride)."""
    return math.ceil(image_size / stride)


def shifted_anchors(base: torch.Tensor, height: int, width: int, stride: int, centre_offset: float) -> torch.Tensor:
    """Copies of the (A, 4) base anchors at every location of a height x width grid: (H*W*A, 4)."""
    xs = (torch.arange(width, dtype=base.dtype) + centre_offset) * stride  # (W,)
    ys = (torch.arange(height, dtype=base.dtype) + centre_offset) * stride  # (H,)
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
    return (centres + base[None]).reshape(-1, 4)  # (H*W, A, 4) -> (H*W*A, 4)


class Anchors(nn.Module):
    """The anchors of a model's settings (anchor_sizes, anchor_scales, anchor_ratios, anchor_centre_offset,
    integer_anchors) for any image size, built once per size on the CPU and copied to the device where they are used.

    The cache keeps the `max_cached` most recent (size, device) pairs: multi-scale training meets a few dozen
    padded sizes. A centre offset of 0.5 puts the anchor of cell (i, j) at ((j + 0.5) * stride, (i + 0.5) * stride),
    the centre of the cell in input pixels (Detectron, yhenon); torchvision uses 0. Integer anchors are torchvision's
    whole-pixel ones (see base_anchors).
    """

    def __init__(self, settings: ModelSettings, max_cached: int = 32):
        super().__init__()
        self.settings, self.num_anchors, self.max_cached = settings, settings.num_anchors, max_cached  # A
        self.strides = tuple(2**level for level in PYRAMID_LEVELS)  # P_l has stride 2^l
        self._cache: dict[tuple, torch.Tensor] = {}

    def num_per_level(self, image_height: int, image_width: int) -> list[int]:
        """H_l * W_l * A for each level: how the R anchors of an image split into levels."""
        return [grid_size(image_height, s) * grid_size(image_width, s) * self.num_anchors for s in self.strides]

    def per_level(self, image_height: int, image_width: int) -> list[torch.Tensor]:
        """One (H_l*W_l*A, 4) float32 tensor of x1y1x2y2 anchors per pyramid level, in input pixels, on the CPU."""
        s = self.settings
        return [shifted_anchors(base_anchors(size, s.anchor_ratios, s.anchor_scales, s.integer_anchors),
                                grid_size(image_height, stride), grid_size(image_width, stride), stride,
                                s.anchor_centre_offset).float() for size, stride in zip(s.anchor_sizes, self.strides)]

    def for_size(self, image_height: int, image_width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The (R, 4) anchors of an image size on `device`, built on the CPU once, then cached there."""
        device = torch.device(device)
        key = (image_height, image_width, device)
        if key not in self._cache:
            if len(self._cache) >= self.max_cached:
                self._cache.pop(next(iter(self._cache)))  # dicts keep insertion order: drop the oldest
            anchors = torch.cat(self.per_level(image_height, image_width))  # (R, 4)
            if device.type == "cuda":
                anchors = anchors.pin_memory()  # only pinned memory is copied asynchronously
            self._cache[key] = anchors.to(device, non_blocking=True)
        return self._cache[key]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The (R, 4) float32 anchors of a (B, 3, H, W) batch, on its device, also under mixed precision."""
        return self.for_size(images.shape[-2], images.shape[-1], images.device)


# ------------------------------------------------------------------------------------ boxes relative to anchors

# Largest dw/dh that decoding lets through exp(): a box at most 1000/16 times its anchor, as in Detectron.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def centre_size(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split (..., 4) x1y1x2y2 boxes into centre x, centre y, width and height, each (...)."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def encode(anchors: torch.Tensor, boxes: torch.Tensor, std: tuple[float, ...]) -> torch.Tensor:
    """Targets (..., 4) moving `anchors` (..., 4) onto `boxes` (..., 4), x1y1x2y2, each offset divided by its std."""
    ax, ay, aw, ah = centre_size(anchors)
    gx, gy, gw, gh = centre_size(boxes)
    return torch.stack(
        [(gx - ax) / (aw * std[0]), (gy - ay) / (ah * std[1]), torch.log(gw / aw) / std[2],
         torch.log(gh / ah) / std[3]], dim=-1
    )  # (..., 4)


def decode(anchors: torch.Tensor, deltas: torch.Tensor, std: tuple[float, ...],
           max_log_scale: float = MAX_LOG_SCALE) -> torch.Tensor:
    """Boxes (..., 4) x1y1x2y2 of `deltas` (..., 4) applied to `anchors` (..., 4), the inverse of encode; dw and dh
    clamped to `max_log_scale`, so that an untrained network cannot overflow exp()."""
    ax, ay, aw, ah = centre_size(anchors)
    dx, dy, dw, dh = deltas.unbind(dim=-1)
    cx = ax + dx * std[0] * aw
    cy = ay + dy * std[1] * ah
    w = aw * torch.exp((dw * std[2]).clamp(max=max_log_scale))
    h = ah * torch.exp((dh * std[3]).clamp(max=max_log_scale))
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)  # (..., 4)


def clip_boxes(boxes: torch.Tensor, height, width) -> torch.Tensor:
    """(..., 4) x1y1x2y2 boxes clipped to `height` x `width` pixels: numbers, or per-image tensors that broadcast."""
    heights = torch.as_tensor(height, dtype=boxes.dtype, device=boxes.device)
    widths = torch.as_tensor(width, dtype=boxes.dtype, device=boxes.device)
    xs = torch.minimum(boxes[..., 0::2].clamp(min=0), widths[..., None])  # (..., 2): x1, x2
    ys = torch.minimum(boxes[..., 1::2].clamp(min=0), heights[..., None])  # (..., 2): y1, y2
    return torch.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], dim=-1)  # (..., 4)


def has_area(boxes: torch.Tensor) -> torch.Tensor:
    """(...) whether each of the (..., 4) x1y1x2y2 boxes has some area."""
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def batched_box_iou(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(B, G, R): IoU of the (B, G, 4) boxes of B images with the (R, 4) anchors, as torchvision's box_iou."""
    box_areas = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # (B, G)
    anchor_areas = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])  # (R,)
    x1, y1, x2, y2 = (boxes[..., i, None] for i in range(4))  # each (B, G, 1)
    widths = (torch.minimum(x2, anchors[:, 2]) - torch.maximum(x1, anchors[:, 0])).clamp(min=0)  # (B, G, R)
    heights = (torch.minimum(y2, anchors[:, 3]) - torch.maximum(y1, anchors[:, 1])).clamp(min=0)  # (B, G, R)
    intersection = widths * heights
    return intersection / (box_areas[..., None] + anchor_areas - intersection)  # (B, G, 1) + (R,) -> (B, G, R)
