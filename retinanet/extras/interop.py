"""Weights of other RetinaNet implementations, read as this project's: yhenon/pytorch-retinanet's state dicts and
torchvision's `retinanet_resnet50_fpn`.

yhenon's state dicts load wherever a checkpoint does: checkpoint.load_model reads any bare state dict with
yhenon_checkpoint, which renames its parameters and gives it YHENON_SETTINGS and the architecture its tensors fix. torchvision's (v1; COCO_V1 weights, 36.4 box AP on COCO
val2017) is the paper's ResNet-50 RetinaNet (§4, §4.1) with a few choices of its own; convert_torchvision makes a
checkpoint of it, where each choice is a model setting (TORCHVISION_SETTINGS), so nothing about torchvision is
hidden in the model code. Its parameters only need new names; its BatchNorm epsilon is folded into the weights.
"""

from typing import NamedTuple

import torch
from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

from ..model import RetinaNet
from ..settings import BOX_CODINGS, RESNET_BLOCKS, ModelSettings

WRAPPER_PREFIX = "module."  # what (Distributed)DataParallel adds to every key of the model it wraps

# yhenon/pytorch-retinanet: its box coding, the paper's matching rule without low-quality matches, and its
# resizer's 608-pixel shorter side with the longer side at most 1024.
YHENON_SETTINGS = dict(
    **BOX_CODINGS["yhenon"],
    allow_low_quality_matches=False,
    min_size=608,
    max_size=1024,
)
# yhenon's parameter names -> ours (its model is one module; ours is composed of a backbone, an FPN and two
# subnets, as Figure 3 draws it)
YHENON_PREFIXES = {
    "conv1.": "backbone.conv1.", "bn1.": "backbone.bn1.", "layer1.": "backbone.layer1.",
    "layer2.": "backbone.layer2.", "layer3.": "backbone.layer3.", "layer4.": "backbone.layer4.",
    "fpn.P3_1.": "fpn.lateral3.", "fpn.P4_1.": "fpn.lateral4.", "fpn.P5_1.": "fpn.lateral5.",
    "fpn.P3_2.": "fpn.output3.", "fpn.P4_2.": "fpn.output4.", "fpn.P5_2.": "fpn.output5.",
    "fpn.P6.": "fpn.p6.", "fpn.P7_2.": "fpn.p7.",
    "regressionModel.": "box_subnet.", "classificationModel.": "classification_subnet.",
}


def from_yhenon(key: str) -> str:
    """This project's name of a parameter: yhenon's are renamed (YHENON_PREFIXES), ours stay."""
    for old, new in YHENON_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


class Architecture(NamedTuple):
    """What the tensors of a RetinaNet state dict fix."""

    depth: int
    num_classes: int
    num_anchors: int  # A, per location


def infer_architecture(state_dict: dict[str, torch.Tensor]) -> Architecture:
    """Depth, class count and anchors per location of a RetinaNet state dict (this project's names), from the
    number and kind of residual blocks and the subnets' output channels (4A boxes, KA classes)."""
    if "classification_subnet.output.weight" not in state_dict or "box_subnet.output.weight" not in state_dict:
        raise ValueError("not a RetinaNet state dict: it has no classification and box subnet outputs")
    num_anchors = state_dict["box_subnet.output.weight"].shape[0] // 4
    num_classes = state_dict["classification_subnet.output.weight"].shape[0] // num_anchors
    blocks = tuple(
        len({key.split(".")[2] for key in state_dict if key.startswith(f"backbone.layer{stage}.")})
        for stage in range(1, 5)
    )
    bottleneck = "backbone.layer1.0.conv3.weight" in state_dict  # ResNet-50 and deeper (torchvision's Bottleneck)
    for depth, layout in RESNET_BLOCKS.items():
        if layout == blocks and (depth >= 50) == bottleneck:
            return Architecture(depth, num_classes, num_anchors)
    raise ValueError(f"not a ResNet backbone of a known depth: blocks per stage {blocks}")


def yhenon_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict:
    """A checkpoint of this project ("model", "model_settings", "class_names" "0", "1", ...) from a bare state dict,
    such as those yhenon/pytorch-retinanet saves and publishes: its parameters renamed (and the "module." prefix of
    a DataParallel wrapper dropped), its settings yhenon's with the depth and classes its tensors fix."""
    if state_dict and all(key.startswith(WRAPPER_PREFIX) for key in state_dict):
        state_dict = {key[len(WRAPPER_PREFIX):]: value for key, value in state_dict.items()}
    state_dict = {from_yhenon(key): value for key, value in state_dict.items()}
    architecture = infer_architecture(state_dict)
    settings = ModelSettings(**YHENON_SETTINGS, depth=architecture.depth, num_classes=architecture.num_classes)
    if settings.num_anchors != architecture.num_anchors:
        raise ValueError(f"the state dict has {architecture.num_anchors} anchors per location; yhenon's models have "
                         f"{settings.num_anchors}")
    return {"model": state_dict, "model_settings": settings.as_dict(),
            "class_names": [str(label) for label in range(settings.num_classes)]}


# torchvision's RetinaNet where it differs from the paper's defaults (score threshold 0.05, 1000 candidates per
# level and NMS 0.5 are the same there).
TORCHVISION_SETTINGS = dict(
    depth=50,
    p6_from="p5",  # LastLevelP6P7(256, 256): P6 from the 256-channel P5, not from C5 (footnote 2)
    anchor_centre_offset=0.0,  # AnchorGenerator shifts anchors by arange(grid) * stride: the cells' corners
    integer_anchors=True,  # sizes (x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))), base_anchors.round()
    # BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)): raw R-CNN deltas; its regression loss is L1 (fine-tuning here keeps it)
    **BOX_CODINGS["torchvision"],
    max_detections=300,  # detections_per_img=300
    min_size=800,  # GeneralizedRCNNTransform(min_size=800, max_size=1333)
    max_size=1333,
)
# torchvision runs the COCO_V1 weights with FrozenBatchNorm2d's eps set to 0 (overwrite_eps, pytorch/vision#2933)
COCO_V1_BATCHNORM_EPS = 0.0
BATCHNORM_EPS = 1e-5  # nn.BatchNorm2d's default, which this project's ResNet uses
NUM_ANCHORS = 9  # A: torchvision's anchor generator has 3 sizes x 3 aspect ratios per level, as the paper (§4)
COCO_OUTPUTS = 91  # torchvision's COCO models: one output per COCO category id 0..90 (see coco_labels)
# torchvision's module names -> ours
EXTRA_LEVELS = {"p6": "p6", "p7": "p7"}
HEADS = {"classification_head": "classification_subnet", "regression_head": "box_subnet"}


def coco_labels() -> tuple[list[int], list[str]]:
    """torchvision's COCO label indices that are categories, and their names, in order.

    torchvision's COCO model has 91 outputs, one per COCO category id: 0 is "__background__" and the ten ids that
    COCO never used are "N/A", none of which is ever a positive in training. This project labels classes 0..K-1
    by sorted category id (data.datasets.CocoDataset), so torchvision's label `coco_labels()[0][i]` is our label i.
    """
    categories = RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    labels = [label for label, name in enumerate(categories) if name not in ("__background__", "N/A")]
    return labels, [categories[label] for label in labels]


def from_torchvision(key: str) -> str:
    """This project's name of a parameter of torchvision's RetinaNet. Both of torchvision's layouts are read:
    since torchvision 0.13 each FPN and head conv is wrapped in a Conv2dNormActivation ("conv.1.0.weight"); the
    published COCO_V1 file predates that ("conv.2.weight": the ReLUs sit at the odd indices)."""
    parts = key.split(".")
    if key.startswith("backbone.body."):  # torchvision's ResNet-50: the same names as ours
        return "backbone." + key.removeprefix("backbone.body.")
    if key.startswith("backbone.fpn.extra_blocks."):
        return f"fpn.{EXTRA_LEVELS[parts[3]]}.{parts[-1]}"
    if key.startswith(("backbone.fpn.inner_blocks.", "backbone.fpn.layer_blocks.")):
        level = int(parts[3]) + 3  # blocks 0, 1, 2 act on C3, C4, C5
        conv = "lateral" if parts[2] == "inner_blocks" else "output"  # 1x1 lateral, 3x3 output
        return f"fpn.{conv}{level}.{parts[-1]}"
    if key.startswith("head.") and parts[1] in HEADS:
        head = HEADS[parts[1]]
        if parts[2] in ("cls_logits", "bbox_reg"):
            return f"{head}.output.{parts[-1]}"
        if len(parts) == 5:  # conv.2i.weight: Sequential(Conv2d, ReLU, Conv2d, ReLU, ...)
            return f"{head}.conv{int(parts[3]) // 2 + 1}.{parts[-1]}"
        if parts[4] == "0":  # conv.i.0.weight: the Conv2d of Conv2dNormActivation i
            return f"{head}.conv{int(parts[3]) + 1}.{parts[-1]}"
    raise ValueError(f"{key!r} is not a parameter of torchvision's retinanet_resnet50_fpn (v1; the GroupNorm "
                     f"heads of retinanet_resnet50_fpn_v2 have no counterpart here)")


def fold_batchnorm_eps(state_dict: dict[str, torch.Tensor], source_eps: float) -> None:
    """Rescale each BatchNorm weight in place so that weight / sqrt(var + BATCHNORM_EPS) here equals the source's
    weight / sqrt(var + source_eps), and add the num_batches_tracked counter that FrozenBatchNorm2d lacks."""
    for key in [key for key in state_dict if key.endswith(".running_var")]:
        prefix = key.removesuffix("running_var")
        variance = state_dict[key]
        state_dict[f"{prefix}weight"] = state_dict[f"{prefix}weight"] * torch.sqrt(
            (variance + BATCHNORM_EPS) / (variance + source_eps)
        )
        state_dict.setdefault(f"{prefix}num_batches_tracked", torch.tensor(0))


def keep_classes(state_dict: dict[str, torch.Tensor], labels: list[int]) -> None:
    """Keep only the classification outputs of `labels` (in that order) in place: output channel a*K + k."""
    weight = state_dict["classification_subnet.output.weight"]  # (A*K, C, 3, 3)
    bias = state_dict["classification_subnet.output.bias"]  # (A*K,)
    num_classes = weight.shape[0] // NUM_ANCHORS
    index = torch.tensor(labels)
    kept_weight = weight.reshape(NUM_ANCHORS, num_classes, *weight.shape[1:])[:, index]  # (A, K', C, 3, 3)
    state_dict["classification_subnet.output.weight"] = kept_weight.flatten(0, 1)  # (A*K', C, 3, 3)
    kept_bias = bias.reshape(NUM_ANCHORS, num_classes)[:, index]  # (A*K,) -> (A, K) -> (A, K')
    state_dict["classification_subnet.output.bias"] = kept_bias.flatten()  # (A*K',)


def convert_torchvision(torchvision_state: dict[str, torch.Tensor], source_eps: float = COCO_V1_BATCHNORM_EPS) -> dict:
    """A checkpoint of this project ("model", "class_names", "model_settings", as train.py writes) from the state
    dict of torchvision's `retinanet_resnet50_fpn` (v1).

    91 outputs are taken to be COCO's (torchvision's COCO_V1 weights): the 80 real categories are kept, named as
    in COCO, so that coco_eval.py maps labels to category ids as for a model trained here. Any other class count
    is kept as it is, label i being torchvision's label i. `source_eps` is the BatchNorm epsilon torchvision runs
    the weights with: 0 for COCO_V1, 1e-5 (its default) for weights trained with torchvision.

    Images are normalised as here (ImageNet mean and std of 0..1 RGB) and resized as torchvision does (800 / 1333).
    """
    state_dict = {from_torchvision(key): value for key, value in torchvision_state.items()}
    fold_batchnorm_eps(state_dict, source_eps)
    num_classes = state_dict["classification_subnet.output.bias"].shape[0] // NUM_ANCHORS
    if num_classes == COCO_OUTPUTS:
        labels, class_names = coco_labels()
        keep_classes(state_dict, labels)
    else:
        class_names = [str(label) for label in range(num_classes)]
    settings = dict(TORCHVISION_SETTINGS, num_classes=len(class_names))
    check_fits(state_dict, settings)
    return {"model": state_dict, "class_names": class_names, "model_settings": settings}


def check_fits(state_dict: dict[str, torch.Tensor], settings: dict) -> None:
    """Raise a ValueError unless `state_dict` has exactly the tensors, and shapes, of RetinaNet(**settings)."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = {key: value.shape for key, value in RetinaNet(ModelSettings(**settings)).state_dict().items()}
    found = {key: value.shape for key, value in state_dict.items()}
    if found != expected:
        differences = sorted(key for key in expected.keys() | found.keys() if expected.get(key) != found.get(key))
        raise ValueError(f"not the state dict of torchvision's retinanet_resnet50_fpn (v1): {len(differences)} "
                         f"tensors missing, unexpected or of another shape, e.g. {differences[:3]}")
