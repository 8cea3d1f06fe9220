import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from retinanet.checkpoint import build_model
from retinanet.model import RetinaNet, freeze_backbone
from retinanet.settings import ModelSettings, initial_freezing


def frozen_names(module: nn.Module) -> set[str]:
    return {name for name, parameter in module.named_parameters() if not parameter.requires_grad}


def stem_and_layer1_names(module: nn.Module) -> set[str]:
    prefixes = ("backbone.conv1.", "backbone.bn1.", "backbone.layer1.")
    return {name for name, _ in module.named_parameters() if name.startswith(prefixes)}


@pytest.mark.parametrize("freeze_at", range(6))
def test_freeze_at_freezes_what_torchvision_trainable_layers_does(freeze_at):
    # detectron2's FREEZE_AT = N is torchvision's trainable_backbone_layers = 5 - N; the ResNets share names.
    model = RetinaNet(ModelSettings(num_classes=3, depth=18)).backbone
    freeze_backbone(model, freeze_at)
    reference = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=5 - freeze_at
    ).body
    assert frozen_names(model) == frozen_names(reference)
    assert all(name.startswith(("conv1.", "bn1.", "layer")) for name in frozen_names(model))  # never FPN or heads


def test_freeze_at_2_freezes_stem_and_layer1_and_keeps_their_gradients_empty():
    model = RetinaNet(ModelSettings(num_classes=3, depth=18, freeze_at=2))
    assert frozen_names(model) == stem_and_layer1_names(model)
    cls_loss, box_loss = model(torch.randn(2, 3, 64, 64), torch.tensor([[[8.0, 8.0, 40.0, 40.0, 1.0]]] * 2))
    (cls_loss + box_loss).backward()
    assert model.backbone.layer1[0].conv1.weight.grad is None and model.backbone.conv1.weight.grad is None
    assert model.backbone.layer2[0].conv1.weight.grad is not None


def test_freeze_at_is_2_for_pretrained_weights_and_0_from_scratch(tmp_path):
    assert initial_freezing(False) == dict(freeze_bn=False, freeze_at=0)
    assert initial_freezing(True) == dict(freeze_bn=True, freeze_at=2)
    scratch = ModelSettings(num_classes=3, depth=18, **initial_freezing(False))
    assert frozen_names(build_model(scratch)) == set()
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    pretrained = ModelSettings(num_classes=3, depth=18, **initial_freezing(True)).replace(freeze_bn=False)
    model = build_model(pretrained, pretrained=str(weights))
    assert frozen_names(model) == stem_and_layer1_names(model)
    model = build_model(pretrained.replace(freeze_at=0), pretrained=str(weights))
    assert frozen_names(model) == set()


def test_freeze_at_out_of_range_is_refused():
    with pytest.raises(ValueError, match="freeze_at"):
        ModelSettings(num_classes=3, depth=18, freeze_at=6)
