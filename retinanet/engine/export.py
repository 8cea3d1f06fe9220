"""ONNX export of the network of Figure 3 (backbone, FPN, subnets; paper §4), with dynamic batch and image size.

Post-processing (§4.1 "Inference": anchors, box decoding, per-level top 1k above 0.05, NMS 0.5) is not in the
graph: its sizes depend on the data (how many scores pass 0.05, how many boxes each image of a dynamic batch keeps
after NMS) and the anchors are cached per image size in Python. It runs on the exported outputs with the model's
own `detect`, the very code of `model.eval()(images)`; the settings it reads are in the file's metadata, for a
port to another runtime.

Legend for shapes: B batch, K classes, R anchors over all levels.
"""

import copy
import json

import torch
from torch import nn

from ..model import RetinaNet

INPUT_NAMES = ["images"]  # (B, 3, H, W) float32 RGB in 0..1; the graph normalises it (network_outputs)
OUTPUT_NAMES = ["cls_logits", "box_deltas"]  # (B, R, K) logits before the sigmoid, (B, R, 4) deltas before decoding
EXAMPLE_IMAGE_SIZE = (320, 320)  # traced shape; batch, height and width stay dynamic in the exported graph


class NetworkOutputs(nn.Module):
    """RetinaNet.network_outputs as a module of its own, for the exporter: (B, 3, H, W) images -> (B, R, K)
    classification logits and (B, R, 4) box deltas, anchors in the order of retinanet/anchors.py."""

    def __init__(self, model: RetinaNet):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.network_outputs(images)


def export_onnx(model: RetinaNet, path: str, class_names: list[str]) -> None:
    """Write the network of `model` (put in eval mode) to `path` as ONNX, with dynamic batch, height and width.

    The model's settings and class names go into the file's metadata (keys "model_settings" and "class_names",
    JSON), for whoever decodes its outputs elsewhere.
    """
    # In the contiguous (NCHW) layout: channels last makes the exporter guard on sizes, losing dynamic shapes.
    network = NetworkOutputs(copy.deepcopy(model).to(memory_format=torch.contiguous_format)).eval()
    example = torch.zeros(1, 3, *EXAMPLE_IMAGE_SIZE, device=next(model.parameters()).device)
    dynamic = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    with torch.no_grad():
        program = torch.onnx.export(
            network, (example,), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
            dynamic_shapes={"images": dynamic}, dynamo=True, verbose=False,
        )
    program.model.metadata_props.update(
        model_settings=json.dumps(model.settings.as_dict()), class_names=json.dumps(list(class_names))
    )
    program.save(path)
