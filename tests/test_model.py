import math
import os
import urllib.error

import pytest
import torch
import torchvision
from test_interop import assert_same_detections

from retinanet.checkpoint import WeightsUnavailableError, build_model
from retinanet.extras.interop import yhenon_checkpoint
from retinanet.model import PyramidFeatures, RetinaNet
from retinanet.settings import ModelSettings, initial_freezing


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return RetinaNet(ModelSettings(num_classes=3, depth=18))


def test_prior_initialization_gives_probability_pi(small_model):
    bias = small_model.classification_subnet.output.bias
    torch.testing.assert_close(torch.sigmoid(bias), torch.full_like(bias, 0.01))
    model = RetinaNet(ModelSettings(num_classes=2, depth=18, prior=0.1))
    torch.testing.assert_close(torch.sigmoid(model.classification_subnet.output.bias), torch.full((18,), 0.1))
    # With σ = 0.01 weights, every anchor starts out near π: the point of the prior (§3.3, §4.1).
    small_model.eval()
    with torch.no_grad():
        features = small_model.fpn(*small_model.backbone(torch.randn(1, 3, 64, 64)))
        probabilities = torch.sigmoid(small_model.classification_subnet(features[0]))
    assert abs(probabilities.mean().item() - 0.01) < 0.002


def test_head_init_is_gaussian_with_sigma_001(small_model):
    weight = small_model.box_subnet.conv2.weight
    assert abs(weight.std().item() - 0.01) < 0.0005
    assert small_model.box_subnet.conv2.bias.abs().max().item() == 0.0


def test_head_output_shapes_follow_the_anchor_order(small_model):
    features = torch.randn(2, 256, 5, 7)
    assert small_model.classification_subnet(features).shape == (2, 5 * 7 * 9, 3)
    assert small_model.box_subnet(features).shape == (2, 5 * 7 * 9, 4)
    # Output channel a*K + k at (y, x) must land at row (y*W + x)*A + a, column k.
    raw = []
    hook = small_model.classification_subnet.output.register_forward_hook(lambda m, i, out: raw.append(out))
    with torch.no_grad():
        flat = small_model.classification_subnet(features)  # (B, H*W*A, K)
    hook.remove()
    y, x, a, k = 3, 4, 5, 2
    assert flat[1, (y * 7 + x) * 9 + a, k] == raw[0][1, a * 3 + k, y, x]


def test_frozen_batchnorm_stays_frozen_after_train():
    model = RetinaNet(ModelSettings(num_classes=2, depth=18, freeze_bn=True))
    model.train()
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and all(not bn.training for bn in batchnorms)
    assert all(not bn.weight.requires_grad and not bn.bias.requires_grad for bn in batchnorms)
    before = model.backbone.bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64), torch.full((2, 1, 5), -1.0))
    torch.testing.assert_close(model.backbone.bn1.running_mean, before)


def test_batchnorm_trains_from_scratch_by_default():
    model = RetinaNet(ModelSettings(num_classes=2, depth=18))
    model.train()
    assert not model.settings.freeze_bn and model.backbone.bn1.training and model.backbone.bn1.weight.requires_grad


def test_pretrained_from_a_local_file_loads_the_backbone(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(ModelSettings(num_classes=2, depth=18, **initial_freezing(True)), pretrained=str(path))
    torch.testing.assert_close(model.backbone.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    # the freezing of weights that start trained: frozen BatchNorm
    assert model.settings.freeze_bn and not model.backbone.bn1.weight.requires_grad


def test_pretrained_of_the_wrong_depth_is_refused(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(ValueError, match="ResNet-18"):
        build_model(ModelSettings(num_classes=2, depth=18), pretrained=str(path))


def test_invalid_depth_and_classes_are_refused():
    with pytest.raises(ValueError, match="depth"):
        RetinaNet(ModelSettings(num_classes=2, depth=42))
    with pytest.raises(ValueError, match="num_classes"):
        RetinaNet(ModelSettings(num_classes=0, depth=18))


def yhenon_keys_and_shapes(num_classes: int) -> dict[str, tuple]:
    """The state dict of yhenon/pytorch-retinanet's ResNet-50 model: torchvision's ResNet-50 without `fc`, then
    its FPN and subnets (public key list of its published COCO checkpoint)."""
    shapes = {k: tuple(v.shape) for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
    fpn = {"P5_1": (256, 2048, 1, 1), "P5_2": (256, 256, 3, 3), "P4_1": (256, 1024, 1, 1), "P4_2": (256, 256, 3, 3),
           "P3_1": (256, 512, 1, 1), "P3_2": (256, 256, 3, 3), "P6": (256, 2048, 3, 3), "P7_2": (256, 256, 3, 3)}
    for name, shape in fpn.items():
        shapes[f"fpn.{name}.weight"], shapes[f"fpn.{name}.bias"] = shape, (256,)
    for head, outputs in (("regressionModel", 9 * 4), ("classificationModel", 9 * num_classes)):
        for conv in ("conv1", "conv2", "conv3", "conv4"):
            shapes[f"{head}.{conv}.weight"], shapes[f"{head}.{conv}.bias"] = (256, 256, 3, 3), (256,)
        shapes[f"{head}.output.weight"], shapes[f"{head}.output.bias"] = (outputs, 256, 3, 3), (outputs,)
    return shapes


def test_state_dict_is_compatible_with_yhenon_checkpoints():
    model = RetinaNet(ModelSettings(num_classes=80, depth=50))
    expected = yhenon_keys_and_shapes(80)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {k: torch.randn(shape) if len(shape) else torch.tensor(0) for k, shape in expected.items()}
    renamed = yhenon_checkpoint(state)["model"]  # yhenon's names -> ours, as every read of a bare state dict does
    assert {k: tuple(v.shape) for k, v in renamed.items()} == ours
    model.load_state_dict(renamed, strict=True)


def test_training_forward_returns_two_scalars(small_model):
    small_model.train()
    annotations = torch.tensor([[[8.0, 8.0, 40.0, 50.0, 1.0]], [[-1.0, -1.0, -1.0, -1.0, -1.0]]])
    cls_loss, box_loss = small_model(torch.randn(2, 3, 64, 64), annotations)
    assert cls_loss.shape == () and box_loss.shape == ()
    assert math.isfinite(cls_loss.item()) and math.isfinite(box_loss.item())


def fake_outputs(batch: int, num_anchors: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R, K) logits far below the threshold and (B, R, 4) zero deltas (boxes = anchors)."""
    return torch.full((batch, num_anchors, num_classes), -10.0), torch.zeros(batch, num_anchors, 4)


def test_detect_suppresses_per_class_and_handles_empty_images():
    model = RetinaNet(ModelSettings(num_classes=3, depth=18))
    cls_logits, box_deltas = fake_outputs(2, sum(model.anchors.num_per_level(64, 64)), 3)
    # Image 0: P3 anchors 3 and 3+9 (1:1 anchors of neighbouring cells, IoU 24/40 = 0.6) both say class 1,
    # anchor 3 also says class 2. Image 1: nothing above the threshold.
    cls_logits[0, 3, 1] = 3.0
    cls_logits[0, 12, 1] = 2.0
    cls_logits[0, 3, 2] = 1.0
    detections = model.detect(cls_logits, box_deltas, (64, 64))
    assert len(detections) == 2
    first, second = detections
    assert first["labels"].tolist() == [1, 2]  # anchor 12's class-1 box is suppressed by anchor 3's (IoU 0.6 > 0.5)
    torch.testing.assert_close(first["scores"], torch.sigmoid(torch.tensor([3.0, 1.0])))
    torch.testing.assert_close(first["boxes"], torch.tensor([[0.0, 0.0, 20.0, 20.0]] * 2))  # clipped at 0
    assert second["boxes"].shape == (0, 4) and second["scores"].shape == (0,) and second["labels"].shape == (0,)
    assert second["labels"].dtype == torch.int64


def test_detect_keeps_at_most_max_detections_and_topk_per_level():
    model = RetinaNet(ModelSettings(num_classes=2, depth=18, max_detections=5, topk_candidates=3))
    generator = torch.Generator().manual_seed(0)
    cls_logits = torch.randn(1, sum(model.anchors.num_per_level(256, 256)), 2, generator=generator) + 5  # all pass 0.05
    deltas = torch.zeros(*cls_logits.shape[:2], 4)
    uncapped = RetinaNet(model.settings.replace(max_detections=100)).detect(cls_logits, deltas, (256, 256))
    assert 5 < len(uncapped[0]["scores"]) <= 5 * 3 * 2  # the cap binds; 3 candidates per level
    detections = model.detect(cls_logits, deltas, (256, 256))
    assert len(detections[0]["scores"]) == 5
    assert (detections[0]["scores"][:-1] >= detections[0]["scores"][1:]).all()


def test_detect_clips_each_image_to_its_own_size_and_drops_boxes_in_its_padding():
    # Two images padded to 64 x 96: image 0 fills it, image 1 is 64 x 32. The same confident anchors in both:
    # one inside image 1 (P3 cell (1, 1)), one on its right edge (cell (1, 4), centred at x = 36), and one that lies
    # wholly in its padding (cell (1, 8), centred at x = 68).
    model = RetinaNet(ModelSettings(num_classes=2, depth=18))
    cls_logits, box_deltas = fake_outputs(2, sum(model.anchors.num_per_level(64, 96)), 2)
    cells_per_row = 96 // 8
    for x, score in ((1, 4.0), (4, 3.0), (8, 2.0)):
        cls_logits[:, (cells_per_row + x) * 9 + 3, 0] = score  # the 1:1 anchor of scale 1, 32 x 32
    both = model.detect(cls_logits, box_deltas, (64, 96), torch.tensor([[64, 96], [64, 32]]))
    assert len(both[0]["scores"]) == 3
    small = both[1]
    torch.testing.assert_close(small["boxes"], torch.tensor([[0.0, 0.0, 28.0, 28.0], [20.0, 0.0, 32.0, 28.0]]))
    torch.testing.assert_close(small["scores"], torch.sigmoid(torch.tensor([4.0, 3.0])))
    # Batched inference gives each image what it gets alone, on the same padded input.
    for index, detections in enumerate(both):
        alone = model.detect(cls_logits[index:index + 1], box_deltas[index:index + 1], (64, 96),
                             torch.tensor([[64, 96], [64, 32]])[index:index + 1])[0]
        assert all(torch.equal(detections[key], alone[key]) for key in ("boxes", "scores", "labels"))


def test_batched_inference_of_images_of_different_sizes_equals_one_image_at_a_time():
    torch.manual_seed(0)
    model = RetinaNet(ModelSettings(num_classes=3, depth=18)).eval()
    with torch.no_grad():
        model.classification_subnet.output.bias.fill_(-2.0)  # scores near 0.12: many detections, everywhere
    sizes = torch.tensor([[96, 128], [64, 64], [128, 96]])  # (height, width) of three images in one padded batch
    images = torch.zeros(3, 3, 128, 128)
    for image, (height, width) in zip(images, sizes.tolist()):
        image[:, :height, :width] = torch.randn(3, height, width)
    with torch.no_grad():
        batched = model(images, image_sizes=sizes)
        alone = [model(images[i:i + 1], image_sizes=sizes[i:i + 1])[0] for i in range(3)]
    for detections, single, (height, width) in zip(batched, alone, sizes.tolist()):
        assert len(detections["scores"]) > 10
        # the same detections; the convolutions round differently at another batch size (differences ~1e-6)
        assert_same_detections(detections, single, box_atol=1e-3, score_atol=1e-5)
        boxes = detections["boxes"]
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()  # inside the image, not its padding
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()  # no empty box takes a slot


def test_eval_forward_format_for_a_batch_of_two(small_model):
    small_model.eval()
    with torch.no_grad():
        detections = small_model(torch.randn(2, 3, 96, 64))
    assert len(detections) == 2
    for d in detections:
        assert set(d) == {"boxes", "scores", "labels"}
        assert d["boxes"].shape[1:] == (4,) and d["labels"].dtype == torch.int64


def test_model_overfits_one_tiny_batch():
    torch.manual_seed(0)
    model = RetinaNet(ModelSettings(num_classes=2, depth=18))
    images = torch.randn(2, 3, 96, 96)
    annotations = torch.tensor(
        [[[10.0, 10.0, 50.0, 60.0, 0.0], [60.0, 40.0, 90.0, 90.0, 1.0]],
         [[20.0, 30.0, 80.0, 70.0, 1.0], [-1.0, -1.0, -1.0, -1.0, -1.0]]]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(30):
        cls_loss, box_loss = model(images, annotations)
        optimizer.zero_grad()
        (cls_loss + box_loss).backward()
        optimizer.step()
        losses.append((cls_loss + box_loss).item())
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_offline_pretrained_download_fails_with_a_helpful_message(monkeypatch):
    def no_network(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", no_network)
    with pytest.raises(WeightsUnavailableError) as error:
        build_model(ModelSettings(num_classes=2, depth=18), pretrained=True)
    message = str(error.value)
    assert "resnet18-f37072fd.pth" in message  # the file to fetch
    assert "from scratch" in message and "--no_pretrained" in message and "pretrained='PATH'" in message
    assert os.path.join("hub", "checkpoints") in message  # where to put it


def test_p7_trains_on_tiny_maps_under_bf16_as_in_full_precision():
    # PyTorch's bf16 CPU convolution gets the weight gradient of a stride-2 3x3 conv on a 1x1 map wrong (about one
    # call in two, from memory it never wrote); the FPN computes P6 and P7 in float32, so that images of 64 pixels or
    # less train under mixed precision as in fp32. A 64-pixel image: C5 is 2 x 2, P6 1 x 1.
    torch.manual_seed(0)
    fpn = PyramidFeatures(128, 256, 512)
    features = [torch.randn(2, channels, side, side) for channels, side in ((128, 8), (256, 4), (512, 2))]
    upstream = torch.randn(2, 256, 1, 1)  # the gradient reaching P7

    def p7_weight_gradient(autocast: bool) -> torch.Tensor:
        fpn.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            p7 = fpn(*features)[-1]
        (p7.float() * upstream).sum().backward()
        return fpn.p7.weight.grad.clone()

    expected = p7_weight_gradient(autocast=False)
    for _ in range(5):
        torch.testing.assert_close(p7_weight_gradient(autocast=True), expected)
