"""RetinaNet (paper §3.3 "RetinaNet Detector", Figure 3): a ResNet, a feature pyramid on top of it, and two
small subnets that classify and regress boxes at every anchor of every pyramid level. Read top to bottom:
backbone, FPN, subnets, the detector that ties them together with its initialization (§4.1) and inference (§4).

Legend for shapes: B batch, A anchors per location (9), K classes, H, W feature size, R anchors over all levels.
"""

import math
import os
import urllib.error

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import batched_nms, clip_boxes_to_image

from .anchors import Anchors
from .boxes import BOX_CODER_STD, decode
from .losses import RetinaNetLoss

# depth -> (residual block, blocks per stage), He et al. 2016, Table 1
RESNET_LAYOUTS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
    """The backbone (§3.3 "Feature Pyramid Network Backbone"): a ResNet whose stages conv3..conv5 give the
    feature maps C3, C4, C5 at strides 8, 16, 32. Names follow torchvision, so ImageNet weights load as they are.
    """

    def __init__(self, depth: int = 50):
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
        block, blocks_per_stage = RESNET_LAYOUTS[depth]
        self.depth = depth
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(block, 64, blocks_per_stage[0], stride=1)  # C2, stride 4
        self.layer2 = self._make_stage(block, 128, blocks_per_stage[1], stride=2)  # C3, stride 8
        self.layer3 = self._make_stage(block, 256, blocks_per_stage[2], stride=2)  # C4, stride 16
        self.layer4 = self._make_stage(block, 512, blocks_per_stage[3], stride=2)  # C5, stride 32
        self.feature_channels = tuple(width * block.expansion for width in (128, 256, 512))  # C3, C4, C5
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_stage(self, block, width: int, num_blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != width * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, width * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(width * block.expansion),
            )
        blocks = [block(self.inplanes, width, stride, downsample)]
        self.inplanes = width * block.expansion
        blocks += [block(self.inplanes, width) for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)

    def backbone_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """C3, C4, C5 of a (B, 3, H, W) batch."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        c3 = self.layer2(self.layer1(x))
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c3, c4, c5


class PyramidFeatures(nn.Module):
    """Feature Pyramid Network (§3.3, Lin et al. 2017 FPN): P3..P7, each with `feature_size` channels.

    Attribute names (P5_1, P5_2, ...) are those of yhenon/pytorch-retinanet, whose checkpoints load unchanged.
    """

    def __init__(
        self,
        c3_channels: int,
        c4_channels: int,
        c5_channels: int,
        feature_size: int = 256,
        p6_from: str = "c5",  # footnote 2: P6 from C5; torchvision's retinanet_resnet50_fpn (v1) takes it from P5
    ):
        super().__init__()
        if p6_from not in ("c5", "p5"):
            raise ValueError(f'p6_from must be "c5" (the paper) or "p5" (torchvision), got {p6_from!r}')
        self.p6_from = p6_from
        # "_1" convs are the 1x1 lateral connections, "_2" the 3x3 convs that smooth each merged map.
        self.P5_1 = nn.Conv2d(c5_channels, feature_size, kernel_size=1)
        self.P5_2 = nn.Conv2d(feature_size, feature_size, kernel_size=3, padding=1)
        self.P4_1 = nn.Conv2d(c4_channels, feature_size, kernel_size=1)
        self.P4_2 = nn.Conv2d(feature_size, feature_size, kernel_size=3, padding=1)
        self.P3_1 = nn.Conv2d(c3_channels, feature_size, kernel_size=1)
        self.P3_2 = nn.Conv2d(feature_size, feature_size, kernel_size=3, padding=1)
        # Footnote 2: "P6 is obtained via a 3×3 stride-2 conv on C5, and P7 is computed by applying ReLU
        # followed by a 3×3 stride-2 conv on P6."
        p6_channels = c5_channels if p6_from == "c5" else feature_size
        self.P6 = nn.Conv2d(p6_channels, feature_size, kernel_size=3, stride=2, padding=1)
        self.P7_2 = nn.Conv2d(feature_size, feature_size, kernel_size=3, stride=2, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)  # Caffe2's "xavier" fill, as Detectron's FPN
                nn.init.zeros_(module.bias)

    def forward(self, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor) -> list[torch.Tensor]:
        """[P3, P4, P5, P6, P7] from C3, C4, C5: top-down pathway with nearest-neighbour upsampling, each level
        the sum of the upsampled coarser level and a 1x1 lateral conv of the backbone's map."""
        p5 = self.P5_1(c5)
        p4 = self.P4_1(c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
        p3 = self.P3_1(c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
        outputs = [self.P3_2(p3), self.P4_2(p4), self.P5_2(p5)]
        p6 = self.P6(c5 if self.p6_from == "c5" else outputs[-1])  # with "p5", the smoothed P5 (as torchvision)
        p7 = self.P7_2(F.relu(p6))
        return outputs + [p6, p7]


class Subnet(nn.Module):
    """One of the two subnets (§3.3 "Classification Subnet", "Box Regression Subnet"): "four 3×3 conv layers,
    each with C filters and each followed by ReLU activations, followed by a 3×3 conv layer" with A·outputs
    filters. Shared across all pyramid levels.

    Initialization, §4.1: "All new conv layers except the final one in the RetinaNet subnets are initialized
    with bias b = 0 and a Gaussian weight fill with σ = 0.01."
    """

    def __init__(self, in_channels: int, outputs_per_anchor: int, num_anchors: int = 9, feature_size: int = 256):
        super().__init__()
        self.outputs_per_anchor = outputs_per_anchor
        self.conv1 = nn.Conv2d(in_channels, feature_size, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(feature_size, feature_size, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(feature_size, feature_size, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(feature_size, feature_size, kernel_size=3, padding=1)
        self.output = nn.Conv2d(feature_size, num_anchors * outputs_per_anchor, kernel_size=3, padding=1)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.output):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pyramid level -> (B, H*W*A, outputs_per_anchor), in the anchors' order."""
        x = features
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.relu(conv(x), inplace=True)  # in place: a conv's backward needs its input, not its output
        x = self.output(x)  # (B, A*outputs, H, W)
        x = x.permute(0, 2, 3, 1)  # (B, H, W, A*outputs)
        return x.reshape(x.shape[0], -1, self.outputs_per_anchor)  # (B, H*W*A, outputs)


class RegressionModel(Subnet):
    """Box regression subnet: "For each of the A anchors per spatial location, these 4 outputs predict the
    relative offset between the anchor and the ground-truth box" (§3.3). Outputs (B, H*W*A, 4)."""

    def __init__(self, in_channels: int, num_anchors: int = 9, feature_size: int = 256):
        super().__init__(in_channels, 4, num_anchors, feature_size)


class ClassificationModel(Subnet):
    """Classification subnet: outputs (B, H*W*A, K) logits, "the probability of object presence at each spatial
    position for each of the A anchors and K object classes" (§3.3) once passed through a sigmoid. Returning
    logits lets the loss use log-sigmoid exactly; the sigmoid is applied at inference.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_anchors: int = 9,
        feature_size: int = 256,
        prior: float = 0.01,  # §4.1: π = 0.01 "in all experiments"
    ):
        super().__init__(in_channels, num_classes, num_anchors, feature_size)
        # §3.3 "Initialization": "we set the bias initialization to b = −log((1 − π)/π), where π specifies that
        # at the start of training every anchor should be labeled as foreground with confidence of ∼π".
        nn.init.constant_(self.output.bias, -math.log((1 - prior) / prior))


class RetinaNet(ResNet):
    """The detector: backbone + FPN + subnets + anchors, with the training loss and the inference rule of §4.

    RetinaNet subclasses ResNet so that its state dict keys are those of yhenon/pytorch-retinanet
    (conv1, layer1..4, fpn.*, regressionModel.*, classificationModel.*).

    - `model(images, annotations)` with (B, 3, H, W) images and (B, G, 5) annotations (x1, y1, x2, y2, class;
      padding rows -1) returns (classification_loss, regression_loss).
    - `model(images)` returns B dicts {"boxes": (D, 4) x1y1x2y2 in input pixels, "scores": (D,), "labels": (D,)}.
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 50,
        prior: float = 0.01,  # §4.1 "Initialization": π = 0.01
        score_threshold: float = 0.05,  # §4 "Inference": "after thresholding detector confidence at 0.05"
        topk_candidates: int = 1000,  # §4 "Inference": "at most 1k top-scoring predictions per FPN level"
        nms_threshold: float = 0.5,  # §4 "Inference": "non-maximum suppression with a threshold of 0.5"
        max_detections: int = 100,  # COCO evaluation keeps 100 detections per image
        box_coder_std: tuple[float, ...] = BOX_CODER_STD,  # Detectron's weights (10, 10, 5, 5); torchvision: 1s
        # Settings of other implementations, so that their weights detect exactly as there (retinanet/convert.py):
        anchor_centre_offset: float = 0.5,  # anchors at cell centres (Detectron, yhenon); torchvision: 0, cell corners
        integer_anchors: bool = False,  # torchvision: anchor sides truncated to integers, corners rounded
        p6_from: str = "c5",  # footnote 2: "P6 is obtained via a 3×3 stride-2 conv on C5"; torchvision v1: "p5"
        loss: RetinaNetLoss | None = None,
    ):
        super().__init__(depth)
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        # The primitive constructor arguments, stored in checkpoints so a model can be rebuilt as it was trained.
        self.settings = dict(
            num_classes=num_classes, depth=depth, prior=prior, score_threshold=score_threshold,
            topk_candidates=topk_candidates, nms_threshold=nms_threshold, max_detections=max_detections,
            box_coder_std=tuple(box_coder_std), anchor_centre_offset=anchor_centre_offset,
            integer_anchors=integer_anchors, p6_from=p6_from,
        )
        self.score_threshold = score_threshold
        self.topk_candidates = topk_candidates
        self.nms_threshold = nms_threshold
        self.max_detections = max_detections
        self.box_coder_std = tuple(box_coder_std)
        self.anchors = Anchors(centre_offset=anchor_centre_offset, integer_anchors=integer_anchors)
        self.loss = loss or RetinaNetLoss(box_coder_std=self.box_coder_std)
        self.fpn = PyramidFeatures(*self.feature_channels, p6_from=p6_from)
        self.regressionModel = RegressionModel(256, self.anchors.num_anchors)
        self.classificationModel = ClassificationModel(256, num_classes, self.anchors.num_anchors, prior=prior)
        self.bn_frozen = False

    def freeze_bn(self) -> None:
        """Put every BatchNorm layer in eval mode and stop its affine parameters from training, for good.

        With pretrained ImageNet weights this is the usual choice (Detectron, torchvision): batches of a few
        large images give poor batch statistics, and ImageNet's running statistics are good ones. Training from
        scratch, do NOT freeze: a freshly initialised BatchNorm in eval mode is the identity (mean 0, variance 1,
        scale 1, shift 0), so the network loses all normalisation and deep ResNets then train badly.
        """
        self.bn_frozen = True
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
                module.weight.requires_grad_(False)
                module.bias.requires_grad_(False)

    def train(self, mode: bool = True) -> "RetinaNet":
        """As nn.Module.train, but frozen BatchNorm layers stay in eval mode."""
        super().train(mode)
        if self.bn_frozen:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def forward(self, images: torch.Tensor, annotations: torch.Tensor | None = None):
        features = self.fpn(*self.backbone_features(images))  # [P3, ..., P7], each (B, 256, H_l, W_l)
        cls_logits = [self.classificationModel(level) for level in features]  # each (B, H_l*W_l*A, K)
        box_deltas = [self.regressionModel(level) for level in features]  # each (B, H_l*W_l*A, 4)
        anchors = self.anchors(images)  # each (H_l*W_l*A, 4)
        if annotations is not None:
            return self.loss(
                torch.cat(cls_logits, dim=1),  # (B, R, K)
                torch.cat(box_deltas, dim=1),  # (B, R, 4)
                torch.cat(anchors, dim=0),  # (R, 4)
                annotations,
            )
        return self.detect(cls_logits, box_deltas, anchors, images.shape[-2:])

    @torch.no_grad()
    def detect(self, cls_logits, box_deltas, anchors, image_size) -> list[dict[str, torch.Tensor]]:
        """Paper §4 "Inference": per level, the top-scoring 1k candidates above 0.05; decoded boxes of all
        levels "are merged and non-maximum suppression with a threshold of 0.5 is applied"."""
        candidates = [self.top_candidates(*level) for level in zip(cls_logits, box_deltas, anchors)]
        boxes, scores, labels = (torch.cat(parts, dim=1) for parts in zip(*candidates))  # (B, C, ...), C candidates
        boxes = clip_boxes_to_image(boxes, tuple(image_size))
        batch_size = boxes.shape[0]
        image_index = torch.arange(batch_size, device=boxes.device)[:, None].expand_as(scores)  # (B, C)
        keep = scores > self.score_threshold  # (B, C)
        boxes, scores, labels, image_index = boxes[keep], scores[keep], labels[keep], image_index[keep]  # (D, ...)
        # One NMS call for the whole batch: boxes of different images or classes never suppress each other.
        kept = batched_nms(boxes, scores, image_index * self.num_classes + labels, self.nms_threshold)
        detections = []
        for i in range(batch_size):
            mine = kept[image_index[kept] == i][: self.max_detections]  # sorted by decreasing score
            detections.append({"boxes": boxes[mine], "scores": scores[mine], "labels": labels[mine]})
        return detections

    def top_candidates(self, logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor):
        """The topk_candidates best (anchor, class) pairs of one level: boxes (B, k, 4), scores and labels (B, k)."""
        num_classes = logits.shape[-1]
        scores = torch.sigmoid(logits.float()).flatten(1)  # (B, R_l, K) -> (B, R_l*K)
        scores, flat_index = scores.topk(min(self.topk_candidates, scores.shape[1]), dim=1)  # (B, k)
        anchor_index = flat_index // num_classes  # (B, k)
        labels = flat_index % num_classes  # (B, k)
        deltas = torch.gather(deltas.float(), 1, anchor_index[..., None].expand(-1, -1, 4))  # (B, k, 4)
        return decode(anchors[anchor_index], deltas, self.box_coder_std), scores, labels


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be downloaded or found; the message says how to proceed."""


def imagenet_state_dict(depth: int, pretrained: bool | str | os.PathLike) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for a ResNet of `depth`, from the torch hub cache, the internet, or a path."""
    if not isinstance(pretrained, bool):
        return torch.load(pretrained, map_location="cpu", weights_only=True)
    weights = torchvision.models.get_weight(f"ResNet{depth}_Weights.IMAGENET1K_V1")
    try:
        return weights.get_state_dict(progress=True)
    except (urllib.error.URLError, OSError) as error:
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise WeightsUnavailableError(
            f"Could not get the ImageNet weights of ResNet-{depth} ({error}). They are downloaded from "
            f"{weights.url}, and this machine seems to have no internet access. Either train from scratch "
            f"(--no_pretrained in train.py, pretrained=False in Python; BatchNorm then stays trainable), or "
            f"download that file on another machine and put it at {cache}, where torchvision looks first, or "
            f"pass the file's path instead (--pretrained PATH, or pretrained='PATH')."
        ) from error


def load_backbone_weights(model: RetinaNet, state_dict: dict[str, torch.Tensor]) -> None:
    """Load an ImageNet ResNet state dict into the backbone; every backbone tensor must be there."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    backbone_missing = [key for key in missing if not key.startswith(("fpn.", "regressionModel.", "classificationModel."))]
    unexpected = [key for key in unexpected if not key.startswith("fc.")]  # the ImageNet classifier is not used
    if backbone_missing or unexpected:
        raise ValueError(
            f"The ImageNet weights do not fit a ResNet-{model.depth}: missing {backbone_missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


# What freeze_at counts, in order: the stem (conv1 + bn1), then the residual stages conv2_x .. conv5_x.
BACKBONE_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
PRETRAINED_FREEZE_AT = 2  # detectron2's FREEZE_AT = 2, torchvision's trainable_backbone_layers = 3


def freeze_backbone(model: ResNet, freeze_at: int) -> None:
    """Stop training the stem and the first freeze_at - 1 residual stages: their parameters get requires_grad False.

    freeze_at = 0 freezes nothing, 1 the stem (conv1, bn1), 2 the stem and layer1, ..., 5 the whole ResNet, as
    detectron2's FREEZE_AT; torchvision's trainable_backbone_layers is 5 - freeze_at. The first layers' ImageNet
    filters (edges, colours) transfer as they are, and backpropagation stops before the largest feature maps.
    BatchNorm running statistics are left to freeze_bn, which build_retinanet applies with pretrained weights.
    """
    if not 0 <= freeze_at <= len(BACKBONE_STAGES):
        raise ValueError(f"freeze_at must be in 0..{len(BACKBONE_STAGES)}, got {freeze_at}")
    for stage in BACKBONE_STAGES[:freeze_at]:
        for name in stage:
            getattr(model, name).requires_grad_(False)


def build_retinanet(
    depth: int,
    num_classes: int,
    pretrained: bool | str | os.PathLike = False,
    freeze_bn: bool | None = None,
    freeze_at: int | None = None,
    **kwargs,
) -> RetinaNet:
    """A RetinaNet with a ResNet-`depth` backbone. `pretrained` is False, True (torchvision's ImageNet weights)
    or a path to such a file. By default, starting from pretrained weights freezes BatchNorm and the stem + layer1
    (freeze_at=2, see freeze_backbone); from scratch everything trains (freeze_at=0)."""
    model = RetinaNet(num_classes, depth=depth, **kwargs)
    if pretrained is not False:
        load_backbone_weights(model, imagenet_state_dict(depth, pretrained))
    if freeze_bn is None:
        freeze_bn = pretrained is not False  # frozen BatchNorm needs trained statistics: see RetinaNet.freeze_bn
    if freeze_bn:
        model.freeze_bn()
    if freeze_at is None:
        freeze_at = PRETRAINED_FREEZE_AT if pretrained is not False else 0  # random filters must all learn
    freeze_backbone(model, freeze_at)
    return model


def resnet18(num_classes: int, pretrained: bool | str = False, **kwargs) -> RetinaNet:
    """RetinaNet with a ResNet-18 backbone."""
    return build_retinanet(18, num_classes, pretrained, **kwargs)


def resnet34(num_classes: int, pretrained: bool | str = False, **kwargs) -> RetinaNet:
    """RetinaNet with a ResNet-34 backbone."""
    return build_retinanet(34, num_classes, pretrained, **kwargs)


def resnet50(num_classes: int, pretrained: bool | str = False, **kwargs) -> RetinaNet:
    """RetinaNet with a ResNet-50 backbone (the paper's default, §5.1)."""
    return build_retinanet(50, num_classes, pretrained, **kwargs)


def resnet101(num_classes: int, pretrained: bool | str = False, **kwargs) -> RetinaNet:
    """RetinaNet with a ResNet-101 backbone."""
    return build_retinanet(101, num_classes, pretrained, **kwargs)


def resnet152(num_classes: int, pretrained: bool | str = False, **kwargs) -> RetinaNet:
    """RetinaNet with a ResNet-152 backbone."""
    return build_retinanet(152, num_classes, pretrained, **kwargs)
