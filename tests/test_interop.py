"""Published weights detect here as in the code that made them: yhenon/pytorch-retinanet's state dicts (against a
re-implementation of its inference, written here from the semantics of its anchors.py, utils.py and model.py) and
torchvision's retinanet_resnet50_fpn (run side by side, through tools/convert_torchvision.py)."""

import importlib.util
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import nms

from retinanet.anchors import Anchors
from retinanet.checkpoint import load_model, read_checkpoint
from retinanet.extras.interop import YHENON_PREFIXES, coco_labels, convert_torchvision
from retinanet.model import RetinaNet, normalize
from retinanet.settings import ModelSettings

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def load_tool(name: str):
    """A script of tools/ as a module, to call its main(argv)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same_detections(ours: dict, theirs: dict, box_atol: float, score_atol: float) -> None:
    """The same detections, in any order: each of ours has exactly one counterpart with the same label, a box
    within box_atol pixels and a score within score_atol, and vice versa. Order is not compared: two detections
    whose scores differ by float rounding only may come in either order."""
    assert len(ours["scores"]) == len(theirs["scores"])
    same = (
        (ours["labels"][:, None] == theirs["labels"][None])
        & ((ours["boxes"][:, None] - theirs["boxes"][None]).abs().amax(-1) <= box_atol)
        & ((ours["scores"][:, None] - theirs["scores"][None]).abs() <= score_atol)
    )  # (D_ours, D_theirs)
    assert (same.sum(1) == 1).all() and (same.sum(0) == 1).all()


# yhenon/pytorch-retinanet's inference, from its code's semantics: its own base-anchor formula, anchors at
# (i + 0.5) * stride on ceil(size / stride) cells, deltas times (0.1, 0.1, 0.2, 0.2) with no clamp, sigmoid
# scores, clipping, then per class: scores > 0.05 and NMS 0.5. No top-k, no cap on the number of detections.
YHENON_RATIOS = np.array([0.5, 1.0, 2.0])
YHENON_SCALES = np.array([2**0, 2 ** (1 / 3), 2 ** (2 / 3)])
YHENON_STD = torch.tensor([0.1, 0.1, 0.2, 0.2])


def yhenon_anchors(height: int, width: int) -> torch.Tensor:
    """(R, 4) anchors, levels P3..P7, cells row-major, 9 anchors per cell (ratio major, scale minor)."""
    levels = []
    for level in range(3, 8):
        stride, size = 2**level, 2 ** (level + 2)
        ratios = np.repeat(YHENON_RATIOS, len(YHENON_SCALES))  # (9,)
        areas = (size * np.tile(YHENON_SCALES, len(YHENON_RATIOS))) ** 2  # (9,)
        widths = np.sqrt(areas / ratios)  # yhenon: w = sqrt(area / ratio), then h = w * ratio
        heights = widths * ratios
        base = np.stack([-widths / 2, -heights / 2, widths / 2, heights / 2], axis=1)  # (9, 4)
        rows, columns = -(-height // stride), -(-width // stride)  # (size + stride - 1) // stride
        centre_x, centre_y = np.meshgrid((np.arange(columns) + 0.5) * stride, (np.arange(rows) + 0.5) * stride)
        centres = np.stack([centre_x, centre_y, centre_x, centre_y], axis=-1).reshape(-1, 1, 4)  # (cells, 1, 4)
        levels.append((centres + base[None]).reshape(-1, 4))  # (cells, 9, 4) -> (cells*9, 4)
    return torch.from_numpy(np.concatenate(levels).astype(np.float32))  # (R, 4)


def conv(state: dict, name: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """The conv `name` of a state dict applied to x, with 'same' padding."""
    weight = state[f"{name}.weight"]
    return F.conv2d(x, weight, state[f"{name}.bias"], stride=stride, padding=weight.shape[-1] // 2)


def yhenon_network(state: dict, images: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R, K) scores after the sigmoid and (B, R, 4) deltas of a ResNet-18 RetinaNet state dict: torchvision's
    ResNet for the backbone, then yhenon's FPN (upsampling by 2) and subnets as plain convolutions."""
    backbone = torchvision.models.resnet18().eval()
    heads = ("fpn.", "regressionModel.", "classificationModel.")
    missing, _ = backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith(heads)}, strict=False)
    assert missing == ["fc.weight", "fc.bias"]
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(images))))
    c3 = backbone.layer2(backbone.layer1(x))
    c4 = backbone.layer3(c3)
    c5 = backbone.layer4(c4)
    p5 = conv(state, "fpn.P5_1", c5)
    p4 = conv(state, "fpn.P4_1", c4) + F.interpolate(p5, scale_factor=2, mode="nearest")
    p3 = conv(state, "fpn.P3_1", c3) + F.interpolate(p4, scale_factor=2, mode="nearest")
    p6 = conv(state, "fpn.P6", c5, stride=2)
    p7 = conv(state, "fpn.P7_2", F.relu(p6), stride=2)
    levels = [conv(state, "fpn.P3_2", p3), conv(state, "fpn.P4_2", p4), conv(state, "fpn.P5_2", p5), p6, p7]

    def subnet(name: str, level: torch.Tensor, outputs: int) -> torch.Tensor:
        for index in range(1, 5):
            level = F.relu(conv(state, f"{name}.conv{index}", level))
        level = conv(state, f"{name}.output", level).permute(0, 2, 3, 1)  # (B, A*outputs, H, W) -> (B, H, W, A*outputs)
        return level.reshape(level.shape[0], -1, outputs)  # (B, H*W*A, outputs)

    scores = torch.sigmoid(torch.cat([subnet("classificationModel", level, num_classes) for level in levels], 1))
    deltas = torch.cat([subnet("regressionModel", level, 4) for level in levels], dim=1)
    return scores, deltas  # (B, R, K), (B, R, 4)


def yhenon_detect(scores: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor, height: int, width: int) -> dict:
    """Detections of one image from its (R, K) scores, (R, 4) deltas and (R, 4) anchors. yhenon clips x1, y1 at 0
    and x2, y2 at the image size only (ours clips every coordinate to the image: the same but for a box wholly
    outside, of which there is none here), and does not clamp dw, dh (ours does, above log(1000 / 16) only)."""
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    centre_x, centre_y = anchors[:, 0] + 0.5 * widths, anchors[:, 1] + 0.5 * heights
    dx, dy, dw, dh = (deltas * YHENON_STD).unbind(dim=1)
    centre_x, centre_y = centre_x + dx * widths, centre_y + dy * heights
    widths, heights = torch.exp(dw) * widths, torch.exp(dh) * heights
    boxes = torch.stack([
        (centre_x - 0.5 * widths).clamp(min=0), (centre_y - 0.5 * heights).clamp(min=0),
        (centre_x + 0.5 * widths).clamp(max=width), (centre_y + 0.5 * heights).clamp(max=height),
    ], dim=1)  # (R, 4)
    found = {"boxes": [], "scores": [], "labels": []}
    for label in range(scores.shape[1]):
        passing = scores[:, label] > 0.05
        kept = nms(boxes[passing], scores[passing, label], 0.5)
        found["boxes"].append(boxes[passing][kept])
        found["scores"].append(scores[passing, label][kept])
        found["labels"].append(torch.full((len(kept),), label))
    return {key: torch.cat(values) for key, values in found.items()}


def yhenon_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of this project with yhenon's parameter names (conv1..., fpn.P5_1..., classificationModel...)."""
    old_prefix = {new: old for old, new in YHENON_PREFIXES.items()}
    renamed = {}
    for key, value in state_dict.items():
        new = next(prefix for prefix in old_prefix if key.startswith(prefix))
        renamed[old_prefix[new] + key[len(new):]] = value
    return renamed


def yhenon_like_state_dict() -> dict[str, torch.Tensor]:
    """A ResNet-18 RetinaNet state dict, with yhenon's names, whose detections on random images are few, on
    several pyramid levels."""
    torch.manual_seed(0)
    model = RetinaNet(ModelSettings(num_classes=3, depth=18))
    with torch.no_grad():
        for subnet in (model.classification_subnet, model.box_subnet):
            for layer in (subnet.conv1, subnet.conv2, subnet.conv3, subnet.conv4, subnet.output):
                layer.weight.normal_(std=0.03)  # keeps the features' scale through the subnets, unlike σ = 0.01
        # Scale each level so that its logits vary alike: with zero biases, convs and ReLUs scale with the input.
        for name, factor in (("output3", 0.15), ("output4", 0.18), ("output5", 0.37), ("p7", 20.0)):
            getattr(model.fpn, name).weight.mul_(factor)
        model.classification_subnet.output.bias.fill_(-4.6)  # a few scores above 0.05 (logit -2.94)
    return yhenon_names(model.state_dict())


def test_a_dataparallel_state_dict_detects_as_yhenons_inference(tmp_path):
    state = yhenon_like_state_dict()
    path = tmp_path / "yhenon.pt"
    torch.save({f"module.{key}": value for key, value in state.items()}, path)  # saved from nn.DataParallel
    model, class_names = load_model(str(path))
    assert class_names == ["0", "1", "2"]
    torch.manual_seed(1)
    # Multiples of 32, as yhenon's upsampling by 2 needs; such that normalised, as both models see them, they are
    # standard normal.
    images = torch.randn(2, 3, 128, 160) * model.pixel_std + model.pixel_mean
    with torch.no_grad():
        ours = model(images)
        scores, deltas = yhenon_network(state, normalize(images, model.pixel_mean, model.pixel_std), num_classes=3)
    anchors = yhenon_anchors(128, 160)
    anchors_per_level = [len(level) for level in model.anchors.per_level(128, 160)]
    for i in range(len(images)):
        passing_per_level = [(level > 0.05).sum().item() for level in scores[i].split(anchors_per_level)]
        # Few candidates, on several levels: neither our top 1000 per level nor our 100-detection cap matters.
        assert max(passing_per_level) < model.settings.topk_candidates and sum(n > 0 for n in passing_per_level) >= 3
        theirs = yhenon_detect(scores[i], deltas[i], anchors, 128, 160)
        assert 10 <= len(theirs["scores"]) < model.settings.max_detections
        assert_same_detections(ours[i], theirs, box_atol=1e-3, score_atol=1e-5)


def test_a_pickled_whole_model_is_refused_with_how_to_save_its_state_dict(tmp_path):
    path = tmp_path / "model_final.pt"
    torch.save(RetinaNet(ModelSettings(num_classes=2, depth=18)), path)  # what yhenon's train.py does: torch.save(retinanet.module, ...)
    with pytest.raises(ValueError, match="refused") as error:
        load_model(str(path))
    message = str(error.value)
    assert "retinanet.model.RetinaNet" in message and "yhenon" in message
    assert "weights_only=False" in message and "torch.save(model.state_dict(), 'weights.pt')" in message


def published_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of torchvision >= 0.13 in the layout of the COCO_V1 file, which predates it: no
    Conv2dNormActivation ("conv.1.0.weight" was "conv.2.weight", "inner_blocks.0.0.weight" was
    "inner_blocks.0.weight") and no num_batches_tracked (FrozenBatchNorm2d has none)."""
    old = {}
    for key, value in state_dict.items():
        if not key.endswith("num_batches_tracked"):
            key = re.sub(r"conv\.(\d)\.0\.", lambda match: f"conv.{2 * int(match[1])}.", key)
            old[re.sub(r"_blocks\.(\d)\.0\.", r"_blocks.\1.", key)] = value
    return old


def like_coco_v1(model: nn.Module, labels: list[int]) -> None:
    """Make a random torchvision RetinaNet like its COCO_V1 version where the conversion could go wrong: BatchNorm
    with eps 0 (as torchvision runs COCO_V1), varied statistics with variances down to 1e-7 (where eps 1e-5 would
    show), and many detections of the 80 real categories while background and "N/A" never fire."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eps = 0.0
                variance = torch.exp(torch.empty(module.num_features).uniform_(math.log(1e-7), 0.0))
                module.running_var.copy_(variance)
                module.weight.copy_(variance.sqrt() * torch.empty(module.num_features).uniform_(0.5, 1.5))
                module.running_mean.uniform_(-0.1, 0.1)
                module.bias.uniform_(-0.1, 0.1)
        bias = model.head.classification_head.cls_logits.bias.view(9, 91)  # (A*K,) -> (A, K)
        bias.fill_(-20.0)
        bias[:, labels] = torch.empty(9, len(labels)).uniform_(-4.0, -2.0)  # scores 0.02..0.12


def test_torchvision_coco_weights_convert_and_detect_as_in_torchvision(tmp_path):
    torch.manual_seed(0)
    torch.manual_seed(0)
    height, width = 128, 256  # multiples of 128: torchvision's strides (image size // grid size) are then 2^l
    # Sizes that give a resize factor of 1: torchvision's transform only normalises, with ImageNet's mean and std.
    reference = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=height, max_size=width,
    ).eval()
    labels, names = coco_labels()
    like_coco_v1(reference, labels)
    source = tmp_path / "retinanet_resnet50_fpn_coco.pth"
    torch.save(published_layout(reference.state_dict()), source)
    assert load_tool("convert_torchvision").main([str(source), str(tmp_path / "converted.pt")]) == 0
    model, class_names = load_model(str(tmp_path / "converted.pt"))
    assert class_names == names and len(names) == 80 and names[0] == "person" and names[-1] == "toothbrush"
    assert read_checkpoint(str(tmp_path / "converted.pt"))["model_settings"]["p6_from"] == "p5"
    # Today's layout converts to the same tensors as the published one.
    current = convert_torchvision(reference.state_dict())["model"]
    assert all(torch.equal(tensor, current[key]) for key, tensor in model.state_dict().items())

    images = torch.rand(2, 3, height, width)  # RGB in 0..1, as both models take them
    # In torchvision's memory layout (NCHW), so that the convolutions add in the same order: in channels last,
    # ours differ by float rounding (up to 2e-3 px on boxes 200 px wide).
    model.to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        theirs = reference(list(images))
        ours = model(images)
    for mine, expected in zip(ours, theirs):
        assert len(expected["scores"]) == 300  # many detections: torchvision's cap, and ours
        # torchvision keeps boxes that lie wholly outside the image, clipped to zero area; ours drops them, and the
        # next boxes by score take their places. Such boxes suppress nothing: the others are the same.
        boxes = expected["boxes"]
        has_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        expected = {key: value[has_area] for key, value in expected.items()}
        assert len(expected["scores"]) >= 50 and len(mine["scores"]) == 300
        mine = {key: value[: len(expected["scores"])] for key, value in mine.items()}
        mine = dict(mine, labels=torch.tensor(labels)[mine["labels"]])  # our label i is COCO category labels[i]
        # Float rounding: the two sum their convolutions in different orders; over six seeds, the largest box
        # difference was 2.7e-4 to 1.1e-3 px (boxes up to 256 px wide).
        assert_same_detections(mine, expected, box_atol=2e-3, score_atol=1e-5)


def test_torchvision_anchors_by_hand_and_against_its_anchor_generator():
    anchors = Anchors(ModelSettings(num_classes=1, anchor_centre_offset=0.0, integer_anchors=True))
    # P3, sides int(32 * 2^(k/3)) = 32, 40, 50. Ratio 1/2, side s: width s / sqrt(1/2), height s * sqrt(1/2),
    # corners at half of those, rounded. Cell (0, 0) is centred on (0, 0), its corner.
    p3 = anchors.per_level(128, 128)[0]
    expected = torch.tensor([
        [-23.0, -11.0, 23.0, 11.0],  # s = 32: ±22.63, ±11.31
        [-28.0, -14.0, 28.0, 14.0],  # s = 40: ±28.28, ±14.14
        [-35.0, -18.0, 35.0, 18.0],  # s = 50: ±35.36, ±17.68
    ])
    torch.testing.assert_close(p3[:3], expected)
    torch.testing.assert_close(p3[4], torch.tensor([-20.0, -20.0, 20.0, 20.0]))  # 1:1, side 40
    torch.testing.assert_close(p3[9 + 5], torch.tensor([8 - 25.0, -25.0, 8 + 25.0, 25.0]))  # next cell, x + 8
    height, width = 128, 256
    generator = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=2
    ).anchor_generator
    features = [torch.zeros(1, 1, height // 2**level, width // 2**level) for level in range(3, 8)]
    expected = generator(ImageList(torch.zeros(1, 3, height, width), [(height, width)]), features)[0]
    assert torch.equal(torch.cat(anchors.per_level(height, width)), expected)


def test_p6_from_must_be_c5_or_p5():
    assert RetinaNet(ModelSettings(num_classes=2, depth=18, p6_from="p5")).fpn.p6.in_channels == 256
    with pytest.raises(ValueError, match="p6_from"):
        RetinaNet(ModelSettings(num_classes=2, depth=18, p6_from="c6"))


def test_other_class_counts_keep_torchvisions_labels_and_v2_is_refused():
    with torch.device("meta"):  # shapes only
        five_classes = torchvision.models.detection.retinanet_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=5
        ).state_dict()
        version_2 = torchvision.models.detection.retinanet_resnet50_fpn_v2(
            weights=None, weights_backbone=None, num_classes=91
        ).state_dict()
    checkpoint = convert_torchvision(five_classes, source_eps=1e-5)
    assert checkpoint["class_names"] == ["0", "1", "2", "3", "4"]
    assert checkpoint["model_settings"]["num_classes"] == 5
    with pytest.raises(ValueError, match="v2"):
        convert_torchvision(version_2)
