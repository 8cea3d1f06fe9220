"""The host never waits for the device in a training step but once, and inference waits the same few times
whatever the batch size. Counted on the CPU by tools/benchmark.py's HostWaits: every operation that would make a
GPU's host wait (reading a value, a data-dependent size, a boolean-mask selection, a tensor made from host data)."""

import pytest
import torch

from tools.benchmark import HostWaits

from retinanet import inference
from retinanet.model import RetinaNet
from retinanet.settings import ModelSettings
from retinanet.training import TrainStep, build_optimizer


def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(size)
    images = torch.randint(0, 256, (size, 3, 96, 128), dtype=torch.uint8, generator=generator)
    annotations = torch.full((size, 3, 5), -1.0)
    annotations[:, 0] = torch.tensor([8.0, 8.0, 40.0, 50.0, 1.0])
    annotations[0, 1] = torch.tensor([50.0, 30.0, 90.0, 80.0, 2.0])
    return images, annotations


@pytest.mark.parametrize("settings", [dict(), dict(box_loss="giou", loss_normalizer="ema")])
def test_forward_loss_and_backward_never_wait_for_the_device(settings):
    torch.manual_seed(0)
    model = RetinaNet(ModelSettings(num_classes=3, depth=18, **settings))
    images, annotations = batch(2)
    for _ in range(2):  # the first step builds the anchors of this size; the second is the steady state
        with HostWaits() as waits:
            cls_loss, box_loss = model(images, annotations)
            (cls_loss + box_loss).backward()
    assert waits.found == []


def test_a_training_step_reads_from_the_device_once():
    torch.manual_seed(0)
    model = RetinaNet(ModelSettings(num_classes=3, depth=18))
    optimizer = build_optimizer(model, "sgd", lr=0.01)
    step = TrainStep(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"),
                     amp_dtype=torch.bfloat16, clip_grad=10.0)
    images, annotations = batch(2)
    step(images, annotations, stop_requested=False)
    with HostWaits() as waits:
        result = step(images, annotations, stop_requested=False)
    assert waits.found == ["tolist"]  # the losses, stop, non-finite and overflow flags, read together
    assert not result.nonfinite and not result.stop


def test_inference_waits_as_often_for_one_image_as_for_four(monkeypatch):
    monkeypatch.setattr(inference, "nms_within_groups", inference.nms_in_one_call)  # as on a GPU
    torch.manual_seed(0)
    model = RetinaNet(ModelSettings(num_classes=3, depth=18)).eval()
    with torch.no_grad():
        model.classification_subnet.output.bias.fill_(-2.0)  # detections in every image: NMS has work
    found = {}
    for size in (1, 4):
        images, _ = batch(size)
        sizes = torch.tensor([[96, 128]] * size)
        with torch.no_grad():
            model(images, image_sizes=sizes)  # anchors of this size
            with HostWaits() as waits:
                detections = model(images, image_sizes=sizes)
        assert all(len(detection["scores"]) > 10 for detection in detections)
        found[size] = waits.found
    # how many candidates pass 0.05 (nonzero), NMS, and one read of the number of detections of each image
    assert found[1] == found[4] == ["nonzero", "nms", "tolist"]


def test_inference_without_image_sizes_waits_no_more_and_detects_the_same(monkeypatch):
    monkeypatch.setattr(inference, "nms_within_groups", inference.nms_in_one_call)  # as on a GPU
    torch.manual_seed(0)
    model = RetinaNet(ModelSettings(num_classes=3, depth=18)).eval()
    with torch.no_grad():
        model.classification_subnet.output.bias.fill_(-2.0)
    images, _ = batch(2)
    with torch.no_grad():
        given = model(images, image_sizes=torch.tensor([[96, 128]] * 2))  # also builds the anchors of this size
        with HostWaits() as waits:
            default = model(images)
    assert waits.found == ["nonzero", "nms", "tolist"]  # no copy of the image sizes from the host
    for expected, detection in zip(given, default):
        assert len(detection["scores"]) > 10
        assert all(torch.equal(expected[key], detection[key]) for key in ("boxes", "scores", "labels"))


@pytest.mark.parametrize("count, groups", [(0, 1), (300, 4), (3000, 40)])
def test_nms_in_one_call_keeps_what_nms_per_group_keeps(count, groups):
    """The GPU's one call and the CPU's call per group (torchvision's batched_nms above 1,000 boxes, one call below)
    keep the same boxes, in the same order."""
    generator = torch.Generator().manual_seed(count)
    corners = torch.rand(count, 2, generator=generator) * 200
    boxes = torch.cat([corners, corners + 1 + torch.rand(count, 2, generator=generator) * 50], dim=1)
    scores = torch.randperm(count, generator=generator).float() / max(count, 1)  # distinct: one order
    group = torch.randint(0, groups, (count,), generator=generator)
    kept = inference.nms_within_groups(boxes, scores, group, 0.5)
    assert torch.equal(inference.nms_in_one_call(boxes, scores, group, 0.5), kept)
    assert 0 < len(kept) < count or count == 0
