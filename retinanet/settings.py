"""The recipe of a RetinaNet: every setting that shapes the network (§4 "RetinaNet Detector"), its training targets
and losses (§3.2, §4, §4.1 "Focal Loss") and its outputs (§4.1 "Inference"), in one place.

A model is built from its settings, its loss is built from the same settings, and every checkpoint stores them:
whatever reads a checkpoint (resume, fine-tuning, evaluation, drawing, export) rebuilds exactly the model that was
trained. Each default is the paper's where the paper gives one (§4 and §4.1 "Inference", "Focal Loss",
"Optimization"); where it is silent, the comment says whose choice it is (Detectron, the authors' code, detectron2
or torchvision).
"""

import dataclasses
import math
from dataclasses import dataclass

# ResNet depth -> residual blocks in each of its stages conv2_x..conv5_x (He et al. 2016, Table 1)
RESNET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
PYRAMID_LEVELS = (3, 4, 5, 6, 7)  # §4: "we construct a pyramid with levels P3 through P7"
FREEZE_AT_LEVELS = range(6)  # 0 nothing, 1 the stem, 2..5 the stem and the first 1..4 residual stages
PRETRAINED_FREEZE_AT = 2  # detectron2's FREEZE_AT = 2, torchvision's trainable_backbone_layers = 3
P6_SOURCES = ("c5", "p5")  # footnote 2's, torchvision's
BOX_LOSSES = ("smooth_l1", "giou")  # §4.1 "Optimization"'s, detectron2's alternative
LOSS_NORMALIZERS = ("batch", "ema")  # §4.1 "Focal Loss"'s count, detectron2's moving average of it

# Box coding: the standard deviations that divide the R-CNN deltas (dx, dy, dw, dh), and the smooth L1 β on them.
# The paper says "standard smooth L1 loss" (§4.1 "Optimization") and no more; these are what implementations use.
BOX_CODINGS = {
    "detectron": ((1.0, 1.0, 1.0, 1.0), 0.11),  # the authors' code: raw deltas, smooth L1 with β = 0.11
    "detectron2": ((1.0, 1.0, 1.0, 1.0), 0.0),  # detectron2's RetinaNet since 2020: raw deltas, L1 (β = 0)
    "torchvision": ((1.0, 1.0, 1.0, 1.0), 0.0),  # torchvision: raw deltas and an L1 loss (smooth L1 with β = 0)
    "yhenon": ((0.1, 0.1, 0.2, 0.2), 1 / 9),  # yhenon/pytorch-retinanet: Detectron's Fast R-CNN weights, β = 1/9
}


@dataclass(frozen=True)
class ModelSettings:
    """Everything that decides what a RetinaNet computes, with the paper's values as defaults."""

    num_classes: int  # K
    depth: int = 50  # ResNet depth; §4.1 "Initialization": ResNet-50 or -101, §5.1's ablations use ResNet-50
    p6_from: str = "c5"  # footnote 2: "P6 is obtained via a 3×3 stride-2 conv on C5"; torchvision (v1): "p5"

    # §4 "Anchors"; anchor_sizes holds one base size per level P3..P7, the side of its scale-1 square anchor
    anchor_sizes: tuple[float, ...] = (32, 64, 128, 256, 512)  # "areas of 32² to 512² on pyramid levels P3 to P7"
    anchor_scales: tuple[float, ...] = (2**0, 2 ** (1 / 3), 2 ** (2 / 3))  # "sizes {2^0, 2^(1/3), 2^(2/3)}"
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # height / width: "three aspect ratios {1:2, 1:1, 2:1}"
    anchor_centre_offset: float = 0.5  # anchors at cell centres, as Detectron; torchvision: 0, the cells' corners
    integer_anchors: bool = False  # torchvision truncates anchor sides to integers and rounds their corners

    prior: float = 0.01  # §4.1 "Initialization": π = 0.01 and the bias b = -log((1 - π)/π); §3.3 introduces π

    # §4 "Anchors": assignment of anchors to ground-truth boxes
    fg_iou: float = 0.5  # "assigned to ground-truth object boxes using an [IoU] threshold of 0.5"
    bg_iou: float = 0.4  # "and to background if their IoU is in [0, 0.4)"
    allow_low_quality_matches: bool = True  # each box keeps its best anchors, as detectron2 and torchvision

    # §3.2, §4.1 "Focal Loss" and "Optimization"
    alpha: float = 0.25  # Eq. 5; §5.1 "Focal Loss", Table 1b: α = 0.25 with γ = 2 works best
    gamma: float = 2.0  # Eq. 4; §5.1 "Focal Loss", Table 1b
    box_coder_std: tuple[float, ...] = BOX_CODINGS["detectron"][0]
    smooth_l1_beta: float = BOX_CODINGS["detectron"][1]
    box_loss: str = "smooth_l1"  # the paper's; "giou": generalized IoU on decoded boxes, as detectron2 offers
    # §4.1 "Focal Loss": "normalized by the number of anchors assigned to a ground-truth box"
    loss_normalizer: str = "batch"
    loss_normalizer_momentum: float = 0.9  # "ema" normaliser: detectron2's moving average of that number

    # §4.1 "Inference"
    score_threshold: float = 0.05  # "after thresholding detector confidence at 0.05"
    topk_candidates: int = 1000  # "we only decode box predictions from at most 1k top-scoring predictions per FPN level"
    nms_threshold: float = 0.5  # "non-maximum suppression with a threshold of 0.5 is applied"
    max_detections: int = 100  # not in the paper: COCO scores at most 100 detections per image

    # Image scale: a shorter side of 800 pixels, Table 1e's largest (§5.2 "Speed versus Accuracy") and the scale of
    # §5.3's models; Detectron caps the longer side at 1333
    min_size: int = 800
    max_size: int = 1333

    # What stays fixed in training: frozen BatchNorm and stages, as detectron2 with ImageNet weights (model.py)
    freeze_bn: bool = False
    freeze_at: int = 0

    def __post_init__(self):
        for name in ("anchor_sizes", "anchor_scales", "anchor_ratios", "box_coder_std"):
            object.__setattr__(self, name, tuple(float(value) for value in getattr(self, name)))  # lists from JSON
        problems = settings_problems(self)
        if problems:
            raise ValueError("model settings: " + "; ".join(problems))

    @property
    def num_anchors(self) -> int:
        """A, the anchors per location: every scale at every aspect ratio."""
        return len(self.anchor_scales) * len(self.anchor_ratios)

    def as_dict(self) -> dict:
        """The settings as plain values, as a checkpoint stores them."""
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "ModelSettings":
        """A copy with some settings changed."""
        return dataclasses.replace(self, **changes)


def settings_problems(settings: ModelSettings) -> list[str]:
    """What is wrong with a set of settings, in words; empty if nothing."""
    s = settings
    checks = [
        (s.num_classes >= 1, f"num_classes must be at least 1, got {s.num_classes}"),
        (s.depth in RESNET_BLOCKS, f"depth must be one of {list(RESNET_BLOCKS)} (ResNet), got {s.depth}"),
        (s.p6_from in P6_SOURCES, f"p6_from must be one of {P6_SOURCES} (the paper's, torchvision's), got {s.p6_from!r}"),
        (len(s.anchor_sizes) == len(PYRAMID_LEVELS),
         f"anchor_sizes needs one size per level P3..P7, got {s.anchor_sizes}"),
        (all(value > 0 and math.isfinite(value) for value in s.anchor_sizes + s.anchor_scales + s.anchor_ratios)
         and s.anchor_scales and s.anchor_ratios, "anchor sizes, scales and ratios must be positive numbers"),
        (0 < s.bg_iou <= s.fg_iou <= 1, f"need 0 < bg_iou <= fg_iou <= 1, got {s.bg_iou} and {s.fg_iou}"),
        (0 < s.prior < 1, f"prior must be in (0, 1), got {s.prior}"),
        (s.gamma >= 0, f"gamma must be >= 0, got {s.gamma}"),
        (s.alpha <= 1, f"alpha must be in [0, 1] (or negative: no α-balancing), got {s.alpha}"),
        (len(s.box_coder_std) == 4 and all(value > 0 for value in s.box_coder_std),
         f"box_coder_std needs 4 positive numbers, got {s.box_coder_std}"),
        (s.smooth_l1_beta >= 0, f"smooth_l1_beta must be >= 0, got {s.smooth_l1_beta}"),
        (s.box_loss in BOX_LOSSES, f"box_loss must be one of {BOX_LOSSES}, got {s.box_loss!r}"),
        (s.loss_normalizer in LOSS_NORMALIZERS,
         f"loss_normalizer must be one of {LOSS_NORMALIZERS}, got {s.loss_normalizer!r}"),
        (0 < s.min_size <= s.max_size, f"need 0 < min_size <= max_size, got {s.min_size} and {s.max_size}"),
        (s.freeze_at in FREEZE_AT_LEVELS, f"freeze_at must be in 0..{FREEZE_AT_LEVELS[-1]}, got {s.freeze_at}"),
        (s.topk_candidates >= 1 and s.max_detections >= 1, "topk_candidates and max_detections must be at least 1"),
    ]
    return [message for ok, message in checks if not ok]


def initial_freezing(started_trained: bool) -> dict:
    """The freeze_bn and freeze_at settings of a model whose weights start trained (ImageNet's or a checkpoint's):
    frozen BatchNorm, which needs trained statistics, and a frozen stem and layer1 (model.freeze_batchnorm,
    model.freeze_backbone); from scratch, everything trains."""
    return dict(freeze_bn=started_trained, freeze_at=PRETRAINED_FREEZE_AT if started_trained else 0)
