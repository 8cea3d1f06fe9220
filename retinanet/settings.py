"""The recipe of a RetinaNet: every setting that shapes the network (§4 "RetinaNet Detector"), its training targets
and losses (§3.2, §4, §4.1 "Focal Loss") and its outputs (§4.1 "Inference"), in one place; and how the scripts take
it from the command line: one flag per setting, named as the setting.

A model is built from its settings, its loss and its inference read the same settings, and every checkpoint stores
them: whatever reads a checkpoint (resume, fine-tuning, evaluation, drawing, export) rebuilds exactly the model that
was trained. Each default is the paper's where the paper gives one; where it is silent, the comment says whose
choice it is (Detectron, the authors' code, detectron2 or torchvision).
"""

import dataclasses
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# ResNet depth -> residual blocks in each of its stages conv2_x..conv5_x (He et al. 2016, Table 1)
RESNET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
PYRAMID_LEVELS = (3, 4, 5, 6, 7)  # §4: "we construct a pyramid with levels P3 through P7"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the statistics torchvision's ImageNet backbones were trained with, which
IMAGENET_STD = (0.229, 0.224, 0.225)  # the model normalises its input images with
FREEZE_AT_LEVELS = range(6)  # 0 nothing, 1 the stem, 2..5 the stem and the first 1..4 residual stages
PRETRAINED_FREEZE_AT = 2  # detectron2's FREEZE_AT = 2, torchvision's trainable_backbone_layers = 3
P6_SOURCES = ("c5", "p5")  # footnote 2's, torchvision's
BOX_LOSSES = ("smooth_l1", "giou")  # §4.1 "Optimization"'s, detectron2's alternative
LOSS_NORMALIZERS = ("batch", "ema")  # §4.1 "Focal Loss"'s count, detectron2's moving average of it

# Box coding: the standard deviations that divide the R-CNN deltas (dx, dy, dw, dh), and the smooth L1 β on them.
# The paper says "standard smooth L1 loss" (§4.1 "Optimization") and no more; these are what implementations use.
BOX_CODINGS = {
    "detectron": dict(box_coder_std=(1.0, 1.0, 1.0, 1.0), smooth_l1_beta=0.11),  # the authors' code: raw deltas
    "detectron2": dict(box_coder_std=(1.0, 1.0, 1.0, 1.0), smooth_l1_beta=0.0),  # since 2020: raw deltas, L1
    "torchvision": dict(box_coder_std=(1.0, 1.0, 1.0, 1.0), smooth_l1_beta=0.0),  # raw deltas and an L1 loss
    "yhenon": dict(box_coder_std=(0.1, 0.1, 0.2, 0.2), smooth_l1_beta=1 / 9),  # Detectron's Fast R-CNN weights
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
    focal_alpha: float = 0.25  # α, Eq. 5; §5.1 "Focal Loss", Table 1b: α = 0.25 with γ = 2 works best
    focal_gamma: float = 2.0  # γ, Eq. 4; §5.1 "Focal Loss", Table 1b
    box_coder_std: tuple[float, ...] = BOX_CODINGS["detectron"]["box_coder_std"]
    smooth_l1_beta: float = BOX_CODINGS["detectron"]["smooth_l1_beta"]
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
        (s.focal_gamma >= 0, f"focal_gamma must be >= 0, got {s.focal_gamma}"),
        (s.focal_alpha <= 1, f"focal_alpha must be in [0, 1] (or negative: no α-balancing), got {s.focal_alpha}"),
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
    """Frozen BatchNorm, stem and layer1 for weights that start trained (ImageNet's or a checkpoint's)."""
    return dict(freeze_bn=started_trained, freeze_at=PRETRAINED_FREEZE_AT if started_trained else 0)


# ------------------------------------------------------------------------------------------ the command line

# The flag of each setting a user may type: `--{name}`, as add_argument's keyword arguments. Scripts that load a
# trained model take the checkpoint's value for a flag left out; train.py the dataset's default, or the paper's.
SETTING_FLAGS = {
    "depth": dict(type=int, choices=tuple(RESNET_BLOCKS), help="ResNet depth"),
    "min_size": dict(type=int, help="shorter image side after resizing (paper: 800)"),
    "max_size": dict(type=int, help="longest image side after resizing (Detectron: 1333)"),
    "freeze_at": dict(type=int, choices=FREEZE_AT_LEVELS, metavar="{0..5}", help="freeze the stem (1) and the first residual stages (2..5) (default: 2 with pretrained weights or --fine_tune, as detectron2; 0 from scratch)"),
    "box_loss": dict(choices=BOX_LOSSES, help="box regression loss (paper: smooth L1)"),
    "loss_normalizer": dict(choices=LOSS_NORMALIZERS, help="divide losses by this batch's foreground count (paper) or its moving average"),
    "focal_gamma": dict(type=float, help="the focal loss's γ, Eq. 4 (paper: 2; 0 is α-balanced cross entropy, Table 1a)"),
    "focal_alpha": dict(type=float, help="the focal loss's α, Eq. 3 and 5 (paper: 0.25 with γ = 2, Table 1b; negative: no α-balancing)"),
    "anchor_sizes": dict(type=float, nargs=5, metavar="SIZE", help="anchor size on P3..P7 (paper: 32 64 128 256 512)"),
    "anchor_scales": dict(type=float, nargs="+", metavar="SCALE", help="anchor scales per level (paper: 1 1.26 1.587, 2^0, 2^(1/3), 2^(2/3))"),
    "anchor_ratios": dict(type=float, nargs="+", metavar="H/W", help="anchor aspect ratios, height / width (paper: 0.5 1 2)"),
    "score_threshold": dict(type=float, help="detections scoring below this are dropped (paper: 0.05)"),
    "topk_candidates": dict(type=int, help="candidates kept per pyramid level before NMS (paper: 1000)"),
    "nms_threshold": dict(type=float, help="IoU at which NMS removes the lower-scored of two boxes of a class (paper: 0.5)"),
    "max_detections": dict(type=int, help="at most this many detections an image, the best (COCO's 100)"),
}
ANCHOR_SETTINGS = ("anchor_sizes", "anchor_scales", "anchor_ratios")
# What a script that runs a trained model may change: the image size and §4.1 "Inference"'s limits
INFERENCE_SETTINGS = ("min_size", "max_size", "score_threshold", "topk_candidates", "nms_threshold", "max_detections")


def add_setting_flags(group, names) -> None:
    """Add the flag of each setting named to an argparse parser or argument group."""
    for name in names:
        group.add_argument(f"--{name}", **SETTING_FLAGS[name])


def add_inference_flags(parser, model_required: bool = True, workers: int = 0) -> None:
    """The flags of every script that runs a trained model: the checkpoint, batching, device, and the settings of
    INFERENCE_SETTINGS, whose defaults are the checkpoint's (typed_settings gives those typed)."""
    parser.add_argument("--model", required=model_required, metavar="CHECKPOINT", help="checkpoint written by train.py, or a bare state dict")
    parser.add_argument("--batch_size", type=int, default=8, help="images per inference batch (default 8)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=workers, help=f"image loading processes (default {workers}; 0: load in this process)")
    add_setting_flags(parser.add_argument_group("the model's settings, changed for this run (default: the checkpoint's)"),
                      INFERENCE_SETTINGS)


def typed_settings(flags: dict, names) -> dict:
    """The settings among `names` whose flags were typed (not None) in a script's parsed flags, as settings."""
    return {name: tuple(flags[name]) if isinstance(flags[name], list) else flags[name]
            for name in names if flags.get(name) is not None}


def resolve_device(name: str | None = None) -> torch.device:
    """The device named, or CUDA if available; cudnn.benchmark on CUDA (padded sizes: multiples of 32)."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}; expected cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested, but PyTorch sees no CUDA GPU here; use --device cpu")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    return device


def default_workers(max_workers: int = 8) -> int:
    """Data loading processes for each training or inference process: its share of the cores, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(max_workers, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def error_message(error: Exception) -> str:
    """The message of a user's error; one raised in a DataLoader worker arrives with the worker's traceback in it,
    whose last line is the original message."""
    message = str(error)
    if "DataLoader worker" in message:
        message = message.rstrip().splitlines()[-1].removeprefix(f"{type(error).__name__}: ")
    return message


def run_script(run: Callable[[Any], int | None], parsed: Any, prog: str) -> int:
    """The exit status of `run(parsed)`, 0 if it returns None. A user's error (ValueError: a bad file, flag or
    setting, whose message says which) ends it with one line, "{prog}: error: {message}", and exit status 2."""
    try:
        return run(parsed) or 0
    except ValueError as error:
        print(f"{prog}: error: {error_message(error)}", file=sys.stderr)
        return 2
