"""ONNX export of the network (backbone, FPN, subnets; paper §3.3), with dynamic batch and image size.

Post-processing (§4 "Inference": anchors, box decoding, per-level top 1k above 0.05, NMS 0.5) is not in the graph:
its sizes depend on the data (how many scores pass 0.05, how many boxes each image of a dynamic batch keeps after
NMS) and the anchors are cached per image size in Python. It runs on the exported outputs with
`detect_from_outputs`, the very code of `model.eval()(images)`; the settings it reads are in the file's metadata,
for a port to another runtime.

Legend for shapes: B batch, A anchors per location (9), K classes, H, W feature size, R anchors over all levels.
"""

import json

import torch
from torch import nn

from .model import RetinaNet

INPUT_NAMES = ["images"]  # (B, 3, H, W), normalised as for training
OUTPUT_NAMES = ["cls_logits", "box_deltas"]  # (B, R, K) logits before the sigmoid, (B, R, 4) deltas before decoding
EXAMPLE_IMAGE_SIZE = (320, 320)  # traced shape; batch, height and width stay dynamic in the exported graph


class NetworkOutputs(nn.Module):
    """The network of a RetinaNet without post-processing: (B, 3, H, W) images -> (B, R, K) classification
    logits and (B, R, 4) box deltas, anchors in the order of retinanet/anchors.py."""

    def __init__(self, model: RetinaNet):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.fpn(*self.model.backbone_features(images))  # [P3, ..., P7]
        cls_logits = torch.cat([self.model.classificationModel(level) for level in features], dim=1)  # (B, R, K)
        box_deltas = torch.cat([self.model.regressionModel(level) for level in features], dim=1)  # (B, R, 4)
        return cls_logits, box_deltas


def export_onnx(model: RetinaNet, path: str, class_names: list[str]) -> None:
    """Write the network of `model` (put in eval mode) to `path` as ONNX, with dynamic batch, height and width.

    The model's settings and class names go into the file's metadata (keys "model_settings" and "class_names",
    JSON), for whoever decodes its outputs elsewhere.
    """
    network = NetworkOutputs(model).eval()
    example = torch.zeros(1, 3, *EXAMPLE_IMAGE_SIZE, device=model.conv1.weight.device)
    dynamic = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    with torch.no_grad():
        program = torch.onnx.export(
            network, (example,), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
            dynamic_shapes={"images": dynamic}, dynamo=True, verbose=False,
        )
    program.model.metadata_props.update(
        model_settings=json.dumps(model.settings), class_names=json.dumps(list(class_names))
    )
    program.save(path)


def detect_from_outputs(
    model: RetinaNet, cls_logits: torch.Tensor, box_deltas: torch.Tensor, image_size: tuple[int, int]
) -> list[dict[str, torch.Tensor]]:
    """`model.eval()(images)` from the exported network's (B, R, K) and (B, R, 4) outputs for (B, 3, H, W) images
    of `image_size` (H, W): the same anchors, decoding, top-k, threshold and NMS."""
    anchors = model.anchors.per_level(*image_size, dtype=torch.float32, device=cls_logits.device)
    anchors_per_level = [len(level) for level in anchors]
    cls_logits = cls_logits.split(anchors_per_level, dim=1)  # (B, R, K) -> each (B, H_l*W_l*A, K)
    box_deltas = box_deltas.split(anchors_per_level, dim=1)  # (B, R, 4) -> each (B, H_l*W_l*A, 4)
    return model.detect(cls_logits, box_deltas, anchors, image_size)
