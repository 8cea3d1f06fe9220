"""RetinaNet (paper §4 "RetinaNet Detector", Figure 3): a ResNet backbone, a feature pyramid on top of it, and two
small subnets that classify and regress boxes at every anchor of every pyramid level. Read top to bottom: backbone,
FPN, subnets, and the detector that composes them as Figure 3 draws it, initialised as §4.1 "Initialization" says.
The training targets and losses are in losses.py, the inference rule of §4.1 in inference.py, every setting in
settings.py; checkpoint.py builds a model with ImageNet weights in its backbone, or loads a trained one.

Legend for shapes: B batch, A anchors per location (9 by default), K classes, H, W feature size, R anchors over all
levels.
"""

import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .anchors import Anchors
from .inference import detect
from .losses import EMA_START, retinanet_loss
from .settings import IMAGENET_MEAN, IMAGENET_STD, RESNET_BLOCKS, ModelSettings

FPN_CHANNELS = 256  # §4: "all pyramid levels have C = 256 channels"


class ResNet(torchvision.models.ResNet):
    """The backbone (§4 "Feature Pyramid Network Backbone"): torchvision's ResNet without its ImageNet classifier,
    whose stages conv3..conv5 give the feature maps C3, C4, C5 at strides 8, 16, 32. Its names are torchvision's,
    so that torchvision's ImageNet weights load as they are."""

    def __init__(self, depth: int = 50):
        block = Bottleneck if depth >= 50 else BasicBlock  # He et al. 2016, Table 1: bottlenecks from ResNet-50 on
        super().__init__(block, list(RESNET_BLOCKS[depth]))
        del self.avgpool, self.fc  # the ImageNet classifier
        self.depth = depth
        self.feature_channels = tuple(width * block.expansion for width in (128, 256, 512))  # C3, C4, C5

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """C3, C4, C5 of a (B, 3, H, W) batch."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        c3 = self.layer2(self.layer1(x))  # layer1 gives C2, at stride 4
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c3, c4, c5


class PyramidFeatures(nn.Module):
    """Feature Pyramid Network (§4 "Feature Pyramid Network Backbone", after Lin et al.'s FPN): P3..P7, each with
    C channels. Lateral 1x1 convs bring C3..C5 to C channels, a top-down path adds each coarser level upsampled,
    and a 3x3 conv smooths each merged map; P6 and P7 are computed from C5 (footnote 2), not from the top-down path.
    """

    def __init__(self, c3_channels: int, c4_channels: int, c5_channels: int, channels: int = FPN_CHANNELS,
                 p6_from: str = "c5"):
        super().__init__()
        self.p6_from = p6_from
        self.lateral3 = nn.Conv2d(c3_channels, channels, kernel_size=1)
        self.lateral4 = nn.Conv2d(c4_channels, channels, kernel_size=1)
        self.lateral5 = nn.Conv2d(c5_channels, channels, kernel_size=1)
        self.output3 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.output4 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.output5 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        # Footnote 2: "P6 is obtained via a 3×3 stride-2 conv on C5, and P7 is computed by applying ReLU followed
        # by a 3×3 stride-2 conv on P6." torchvision's retinanet_resnet50_fpn (v1) takes P6 from P5 instead.
        self.p6 = nn.Conv2d(c5_channels if p6_from == "c5" else channels, channels, kernel_size=3, stride=2, padding=1)
        self.p7 = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)  # Caffe2's "xavier" fill, as Detectron's FPN
                nn.init.zeros_(module.bias)

    def forward(self, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor) -> list[torch.Tensor]:
        """[P3, P4, P5, P6, P7] from C3, C4, C5; nearest-neighbour upsampling in the top-down path."""
        p5 = self.lateral5(c5)
        p4 = self.lateral4(c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
        p3 = self.lateral3(c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
        outputs = [self.output3(p3), self.output4(p4), self.output5(p5)]
        # P6 and P7 in float32 under mixed precision: maps of a few cells, and PyTorch's bf16 CPU convolution gets the
        # weight gradient of a stride-2 3x3 conv on a 1x1 map wrong (images of 64 pixels or less; tests/test_model.py)
        with torch.autocast(c5.device.type, enabled=False):
            p6 = self.p6((c5 if self.p6_from == "c5" else outputs[-1]).float())  # "p5": the smoothed P5, as torchvision
            p7 = self.p7(F.relu(p6))
        return outputs + [p6, p7]


class Subnet(nn.Module):
    """One of the two subnets (§4 "Classification Subnet", "Box Regression Subnet"): "four 3×3 conv layers,
    each with C filters and each followed by ReLU activations, followed by a 3×3 conv layer" with A·outputs
    filters. Shared across all pyramid levels.

    Initialization, §4.1: "All new conv layers except the final one in the RetinaNet subnets are initialized
    with bias b = 0 and a Gaussian weight fill with σ = 0.01."
    """

    def __init__(self, in_channels: int, outputs_per_anchor: int, num_anchors: int, feature_size: int = FPN_CHANNELS):
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
    relative offset between the anchor and the ground-truth box" (§4). Outputs (B, H*W*A, 4)."""

    def __init__(self, in_channels: int, num_anchors: int, feature_size: int = FPN_CHANNELS):
        super().__init__(in_channels, 4, num_anchors, feature_size)


class ClassificationModel(Subnet):
    """Classification subnet: outputs (B, H*W*A, K) logits, "the probability of object presence at each spatial
    position for each of the A anchors and K object classes" (§4) once passed through a sigmoid. Returning
    logits lets the loss use log-sigmoid exactly; the sigmoid is applied at inference.
    """

    def __init__(self, in_channels: int, num_classes: int, num_anchors: int, feature_size: int = FPN_CHANNELS,
                 prior: float = 0.01):  # §4.1 "Initialization": π = 0.01 "in all experiments"
        super().__init__(in_channels, num_classes, num_anchors, feature_size)
        # §4.1 "Initialization": "For the final conv layer of the classification subnet, we set the bias
        # initialization to b = −log((1 − π)/π), where π specifies that at the start of training every anchor
        # should be labeled as foreground with confidence of ∼π" (the prior of §3.3).
        nn.init.constant_(self.output.bias, -math.log((1 - prior) / prior))


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB images (uint8, or float in 0..1) normalised with the backbone's ImageNet statistics."""
    if images.dtype == torch.uint8:
        images = images.float() / 255
    return (images - mean) / std


class RetinaNet(nn.Module):
    """The detector of Figure 3: a backbone, a feature pyramid, a classification and a box regression subnet
    shared by all levels, and the anchors they are relative to. Built from its ModelSettings, which also build
    its loss (losses.py) and its inference (inference.py), so that training and inference agree by construction.

    - `model(images, annotations)` with (B, 3, H, W) RGB images (uint8, or float in 0..1; the model normalises
      them) and (B, G, 5) annotations (x1, y1, x2, y2, class; padding rows -1) returns (classification_loss,
      regression_loss).
    - `model(images, image_sizes=sizes)` returns B dicts {"boxes": (D, 4) x1y1x2y2 in input pixels, "scores": (D,),
      "labels": (D,)}; `image_sizes` (B, 2) holds each image's (height, width) inside the padded batch, and boxes
      are clipped to it (default: the whole padded size).
    """

    def __init__(self, settings: ModelSettings):
        super().__init__()
        self.settings = settings
        self.backbone = ResNet(settings.depth)
        self.fpn = PyramidFeatures(*self.backbone.feature_channels, p6_from=settings.p6_from)
        self.classification_subnet = ClassificationModel(FPN_CHANNELS, settings.num_classes, settings.num_anchors,
                                                         prior=settings.prior)
        self.box_subnet = RegressionModel(FPN_CHANNELS, settings.num_anchors)
        self.anchors = Anchors(settings)
        # The ImageNet statistics the backbone's pretrained weights expect, on the model's device (not saved).
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)
        # The "ema" loss normaliser's moving average of the foreground count (losses.normalizer); saved with the
        # training state, not in the state dict
        self.register_buffer("foreground_ema", torch.tensor(EMA_START), persistent=False)
        if settings.freeze_bn:
            freeze_batchnorm(self)
        freeze_backbone(self.backbone, settings.freeze_at)
        # Channels last (NHWC): the layout GPUs' tensor-core convolutions, and this project's CPUs, run fastest.
        self.to(memory_format=torch.channels_last)

    @property
    def num_classes(self) -> int:
        return self.settings.num_classes

    @property
    def depth(self) -> int:
        return self.settings.depth

    def train(self, mode: bool = True) -> "RetinaNet":
        """As nn.Module.train, but frozen BatchNorm layers stay in eval mode."""
        super().train(mode)
        if self.settings.freeze_bn:
            freeze_batchnorm(self)
        return self

    def network_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network of Figure 3: (B, R, K) class logits and (B, R, 4) box deltas of (B, 3, H, W) images."""
        images = normalize(images, self.pixel_mean, self.pixel_std)
        features = self.fpn(*self.backbone(images))  # [P3, ..., P7], each (B, C, H_l, W_l)
        cls_logits = torch.cat([self.classification_subnet(level) for level in features], dim=1)  # (B, R, K)
        box_deltas = torch.cat([self.box_subnet(level) for level in features], dim=1)  # (B, R, 4)
        return cls_logits, box_deltas

    def forward(self, images: torch.Tensor, annotations: torch.Tensor | None = None,
                image_sizes: torch.Tensor | None = None):
        cls_logits, box_deltas = self.network_outputs(images)
        if annotations is not None:
            return retinanet_loss(cls_logits, box_deltas, self.anchors(images), annotations, self.settings,
                                  self.foreground_ema, update_ema=self.training)
        return self.detect(cls_logits, box_deltas, images.shape[-2:], image_sizes)

    @torch.no_grad()
    def detect(self, cls_logits: torch.Tensor, box_deltas: torch.Tensor, padded_size: tuple[int, int],
               image_sizes: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
        """§4.1's inference rule (inference.py) with this model's anchors and settings, on a batch of padded_size."""
        height, width = padded_size
        device = cls_logits.device
        if image_sizes is None:  # every image fills the batch; made on the device, no copy from the host
            image_sizes = torch.full((cls_logits.shape[0], 2), height, device=device)  # (B, 2)
            image_sizes[:, 1].fill_(width)
        anchors = self.anchors.for_size(height, width, device)  # (R, 4)
        anchors_per_level = self.anchors.num_per_level(height, width)
        return detect(cls_logits, box_deltas, anchors, anchors_per_level, image_sizes.to(device, non_blocking=True),
                      self.settings)


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode and stop its affine parameters from training.

    With pretrained ImageNet weights this is the usual choice (Detectron, detectron2, torchvision): batches of a
    few large images give poor batch statistics, and ImageNet's running statistics are good ones. Training from
    scratch, do NOT freeze: a freshly initialised BatchNorm in eval mode is the identity (mean 0, variance 1, scale
    1, shift 0), so the network loses all normalisation and deep ResNets then train badly.
    """
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
            module.weight.requires_grad_(False)
            module.bias.requires_grad_(False)


# What freeze_at counts, in order: the stem (conv1 + bn1), then the residual stages conv2_x .. conv5_x. freeze_at = 0
# freezes nothing, 1 the stem, 2 the stem and layer1, ..., 5 the whole ResNet, as detectron2's FREEZE_AT;
# torchvision's trainable_backbone_layers is 5 - freeze_at. The first layers' ImageNet filters (edges, colours)
# transfer as they are, and backpropagation stops before the largest feature maps.
BACKBONE_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


def freeze_backbone(backbone: ResNet, freeze_at: int) -> None:
    """Stop training the stem and the first freeze_at - 1 residual stages (BACKBONE_STAGES)."""
    for stage in BACKBONE_STAGES[:freeze_at]:
        for name in stage:
            getattr(backbone, name).requires_grad_(False)
