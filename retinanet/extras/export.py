"""ONNX export of a trained RetinaNet, with dynamic batch and image size: the network of Figure 3 alone (backbone,
FPN, subnets; paper §4), or, on request, the whole detector, the network followed by §4.1 "Inference".

The network alone maps images to the (B, R, K) logits and (B, R, 4) deltas that the model's `detect` turns into
detections; the settings it needs are in the file's metadata. The whole detector maps images to at most
max_detections boxes, scores and labels an image, with anchors, decoding and NMS inside the graph: a file that
needs neither this repository nor Python.

Inside the graph, the §4.1 rule is inference.py's, step by step (the same anchors, top_candidates, clipping and
threshold), put in shapes that do not depend on the data, as a graph needs them:
- no candidate is dropped: those below the score threshold, or without area, become boxes of no area, which NMS
  can neither suppress nor be suppressed by, and are left out after it;
- NMS is torchvision's `nms` on all candidates of the batch at once, each (image, class) moved to a region of the
  plane of its own (as torchvision's batched_nms does for export), which ONNX holds as NonMaxSuppression. In
  float32, where the model's own NMS works in float64: the moved coordinates are rounded (by up to 0.004 pixels
  for 80 classes at 1333 pixels), and two boxes whose IoU is that close to the threshold (about 1e-3 for boxes
  of 20 pixels) may be decided differently;
- each image's kept candidates are ranked by score and the best max_detections taken: outputs of a fixed size,
  padded past each image's num_detections.

Legend for shapes: B batch, K classes, R anchors over all levels, C candidates per image (at most topk_candidates
per level), M max_detections.
"""

import copy
import json

import torch
from torch import nn
from torchvision.ops import nms

from ..anchors import clip_boxes, has_area
from ..inference import top_candidates
from ..model import RetinaNet

INPUT_NAMES = ["images"]  # (B, 3, H, W) float32 RGB in 0..1; the graph normalises it (network_outputs)
OUTPUT_NAMES = ["cls_logits", "box_deltas"]  # (B, R, K) logits before the sigmoid, (B, R, 4) deltas before decoding
DETECTION_OUTPUT_NAMES = ["boxes", "scores", "labels", "num_detections"]  # see DetectionGraph
EXAMPLE_IMAGE_SIZE = (320, 320)  # traced shape; batch, height and width stay dynamic in the exported graph
EXAMPLE_BATCH = 2  # a batch of 1 would be taken for a constant one


class NetworkOutputs(nn.Module):
    """RetinaNet.network_outputs as a module of its own, for the exporter: (B, 3, H, W) images -> (B, R, K)
    classification logits and (B, R, 4) box deltas, anchors in the order of retinanet/anchors.py."""

    def __init__(self, model: RetinaNet):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.network_outputs(images)


class DetectionGraph(nn.Module):
    """The model's network and its §4.1 inference as one module that a graph can hold (see the module docstring):
    (B, 3, H, W) float RGB images in 0..1 -> boxes (B, M, 4) x1y1x2y2 in input pixels, scores (B, M), labels
    (B, M) int64 and num_detections (B,) int64. Row i of an image is its i-th best detection for i below its
    num_detections, padding after (box 0, score 0, label -1). M is max_detections, or C for an image so small
    that it has fewer candidates. Boxes are clipped to the whole input, as model(images) clips them."""

    def __init__(self, model: RetinaNet):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        settings = self.model.settings
        height, width = images.shape[-2:]
        cls_logits, box_deltas = self.model.network_outputs(images)  # (B, R, K), (B, R, 4)
        anchors = [level.to(images.device) for level in self.model.anchors.per_level(height, width)]  # (R_l, 4)
        counts = [level.shape[0] for level in anchors]  # shape, not len(): len() would fix the sizes in the graph
        levels = zip(cls_logits.split(counts, dim=1), box_deltas.split(counts, dim=1), anchors)
        candidates = [top_candidates(*level, settings.topk_candidates, settings.box_coder_std) for level in levels]
        boxes, scores, labels = (torch.cat(parts, dim=1) for parts in zip(*candidates))  # (B, C, 4), (B, C), (B, C)
        # Sizes as tensors: clipping to the numbers themselves would fix them in the graph.
        boxes = clip_boxes(boxes, torch.scalar_tensor(height), torch.scalar_tensor(width))  # (B, C, 4)
        confident = (scores > settings.score_threshold) & has_area(boxes)  # (B, C)
        # The candidates not confident become boxes of no area, which NMS keeps and which suppress nothing.
        kept = self.nms_in_one_call(boxes * confident[..., None], scores, labels,
                                    max(height, width))  # (B, C): whether NMS keeps each candidate
        ranked = torch.where(kept & confident, scores, -1.0)  # (B, C)
        best, index = ranked.topk(min(settings.max_detections, ranked.shape[1]), dim=1)  # (B, M) each
        found = best >= 0  # (B, M)
        boxes = torch.gather(boxes, 1, index[..., None].expand(-1, -1, 4)) * found[..., None]  # (B, M, 4)
        labels = torch.where(found, torch.gather(labels, 1, index), -1)  # (B, M)
        return boxes, torch.where(found, best, 0.0), labels, found.sum(dim=1)

    def nms_in_one_call(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                        side: int) -> torch.Tensor:
        """(B, C) whether class-wise NMS of each image keeps each of its (B, C, 4) candidates, boxes within a
        side x side square, with one NMS call: the candidates of class k of image b are moved k squares right and
        b squares down, so that two of another class or image never overlap. (torchvision's batched_nms moves
        them along one axis; two axes keep the coordinates below K * (side + 1), where float32 still holds
        0.01 pixel for 80 classes of an image of 1333 pixels.)"""
        batch_size, num_candidates = scores.shape
        step = side + 1
        rightwards = labels * step  # (B, C)
        downwards = (torch.arange(batch_size, device=labels.device)[:, None] * step).expand_as(labels)  # (B, C)
        shifted = boxes + torch.stack([rightwards, downwards, rightwards, downwards], dim=-1)  # (B, C, 4)
        keep = nms(shifted.reshape(-1, 4), scores.reshape(-1), self.model.settings.nms_threshold)  # (B*C, 4) -> (N,)
        kept = torch.zeros(batch_size * num_candidates, dtype=torch.bool, device=boxes.device)
        return kept.index_fill(0, keep, True).reshape(batch_size, num_candidates)  # (B*C,) -> (B, C)


def export_onnx(model: RetinaNet, path: str, class_names: list[str], detections: bool = False) -> None:
    """Write `model` (put in eval mode) to `path` as ONNX, with dynamic batch, height and width: its network
    (outputs OUTPUT_NAMES), or with `detections` the whole detector (DetectionGraph; outputs DETECTION_OUTPUT_NAMES).

    The model's settings and class names go into the file's metadata (keys "model_settings" and "class_names",
    JSON), for whoever decodes its outputs elsewhere or names its labels.
    """
    # In the contiguous (NCHW) layout: channels last makes the exporter guard on sizes, losing dynamic shapes.
    copied = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    graph = (DetectionGraph(copied) if detections else NetworkOutputs(copied)).eval()
    example = torch.zeros(EXAMPLE_BATCH, 3, *EXAMPLE_IMAGE_SIZE, device=next(model.parameters()).device)
    dynamic = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    with torch.no_grad():
        program = torch.onnx.export(
            graph, (example,), input_names=INPUT_NAMES,
            output_names=DETECTION_OUTPUT_NAMES if detections else OUTPUT_NAMES,
            dynamic_shapes={"images": dynamic}, dynamo=True, verbose=False,
        )
    program.model.metadata_props.update(
        model_settings=json.dumps(model.settings.as_dict()), class_names=json.dumps(list(class_names))
    )
    program.save(path)
