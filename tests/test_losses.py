import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from retinanet.anchors import MAX_LOG_SCALE, batched_box_iou, decode, encode
from retinanet.losses import (BACKGROUND, EMA_START, IGNORED, focal_loss, generalized_iou_loss, match_batch,
                              retinanet_loss, summed_losses)
from retinanet.settings import BOX_CODINGS, ModelSettings

YHENON_STD = BOX_CODINGS["yhenon"]["box_coder_std"]  # (0.1, 0.1, 0.2, 0.2)


def test_focal_loss_equals_torchvision():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 100, 7, generator=generator) * 4
    targets = (torch.rand(4, 100, 7, generator=generator) > 0.9).float()
    for alpha, gamma in [(0.25, 2.0), (0.5, 0.0), (-1, 1.5)]:
        expected = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
        torch.testing.assert_close(focal_loss(logits, targets, alpha, gamma), expected)


def test_focal_loss_with_gamma_0_alpha_half_is_half_the_cross_entropy():
    logits = torch.linspace(-30, 30, 61)
    targets = (torch.arange(61) % 2).float()
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") / 2
    torch.testing.assert_close(focal_loss(logits, targets, alpha=0.5, gamma=0.0), expected)


def test_focal_loss_is_finite_for_extreme_logits():
    logits = torch.tensor([-200.0, 200.0, -200.0, 200.0])
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = focal_loss(logits, targets)
    assert torch.isfinite(loss).all()
    # A confident mistake costs α_t * 1 * 200: 0.25 * 200 for the positive, 0.75 * 200 for the negative.
    torch.testing.assert_close(loss, torch.tensor([50.0, 150.0, 0.0, 0.0]))


def test_encode_by_hand():
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), 10 x 20
    box = torch.tensor([[2.0, 4.0, 22.0, 24.0]])  # centre (12, 14), 20 x 20
    expected = torch.tensor([[(12 - 5) / 10 / 0.1, (14 - 10) / 20 / 0.1, math.log(2) / 0.2, 0.0]])
    torch.testing.assert_close(encode(anchor, box, YHENON_STD), expected)


def test_encode_decode_round_trip():
    generator = torch.Generator().manual_seed(1)
    xy = torch.rand(50, 2, generator=generator) * 500
    anchors = torch.cat([xy, xy + 8 + torch.rand(50, 2, generator=generator) * 300], dim=1)
    xy = torch.rand(50, 2, generator=generator) * 500
    boxes = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=generator) * 300], dim=1)
    for std in (YHENON_STD, (1.0, 1.0, 1.0, 1.0)):
        torch.testing.assert_close(decode(anchors, encode(anchors, boxes, std), std), boxes, rtol=1e-5, atol=1e-3)


def test_decode_clamps_huge_scales():
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    boxes = decode(anchors, torch.tensor([[0.0, 0.0, 1e4, 1e4]]), YHENON_STD)
    assert torch.isfinite(boxes).all()
    # The width is capped at 16 * exp(MAX_LOG_SCALE) = 1000
    torch.testing.assert_close(boxes[0, 2] - boxes[0, 0], torch.tensor(16 * math.exp(MAX_LOG_SCALE)))


def test_matching_thresholds_and_ignore_band_by_hand():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU 1.0 with box 0 -> box 0
            [0.0, 0.0, 10.0, 5.0],  # IoU 0.5 with box 0 -> box 0 (">= 0.5")
            [0.0, 0.0, 10.0, 4.5],  # IoU 0.45 -> ignored
            [0.0, 0.0, 10.0, 4.0],  # IoU 0.4 -> ignored ("[0, 0.4)" is background)
            [0.0, 0.0, 10.0, 2.0],  # IoU 0.2 -> background
            [100.0, 100.0, 110.0, 103.0],  # IoU 0.3 with box 1: background, unless low-quality matches
            [100.0, 100.0, 110.0, 102.0],  # IoU 0.2 with box 1 -> background
            [500.0, 500.0, 510.0, 510.0],  # no overlap -> background
        ]
    )
    valid = torch.tensor([True, True])
    strict = match_batch(anchors, gt[None], valid[None], allow_low_quality_matches=False)[0]
    assert strict.tolist() == [0, 0, IGNORED, IGNORED, BACKGROUND, BACKGROUND, BACKGROUND, BACKGROUND]
    low_quality = match_batch(anchors, gt[None], valid[None])[0]
    assert low_quality.tolist() == [0, 0, IGNORED, IGNORED, BACKGROUND, 1, BACKGROUND, BACKGROUND]


def test_matching_ignores_padding_and_empty_images():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    padded = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert match_batch(anchors, padded[None], torch.tensor([[False]]))[0].tolist() == [BACKGROUND]
    assert match_batch(anchors, torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.bool))[0].tolist() == [BACKGROUND]


def make_batch():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 4.5], [50.0, 50.0, 60.0, 60.0]])
    annotations = torch.tensor(
        [
            [[0.0, 0.0, 10.0, 10.0, 1.0], [-1.0, -1.0, -1.0, -1.0, -1.0]],
            [[-1.0, -1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0, -1.0]],
        ]
    )
    return anchors, annotations


def loss_of(settings: ModelSettings):
    """The loss of a model of these settings, with a fresh moving average of the foreground count."""
    foreground_ema = torch.tensor(EMA_START)
    return lambda *inputs: retinanet_loss(*inputs, settings, foreground_ema)


def test_loss_by_hand_on_a_tiny_batch():
    anchors, annotations = make_batch()
    cls_logits = torch.zeros(2, 3, 2)  # p = 0.5 everywhere
    deltas = torch.zeros(2, 3, 4)
    cls_loss, box_loss = loss_of(ModelSettings(num_classes=2))(cls_logits, deltas, anchors, annotations)
    # One foreground anchor (image 0, anchor 0, class 1); anchor 1 of image 0 is ignored (IoU 0.45).
    # At p = 0.5: FL = α_t * 0.5² * log 2 for every counted element.
    positive = 0.25 * 0.25 * math.log(2)
    negative = 0.75 * 0.25 * math.log(2)
    # image 0: anchor 0 has 1 positive + 1 negative; anchor 2 has 2 negatives; image 1: 3 anchors x 2 negatives
    expected = positive + negative * (1 + 2 + 6)
    torch.testing.assert_close(cls_loss, torch.tensor(expected))
    torch.testing.assert_close(box_loss, torch.tensor(0.0))  # the anchor is the box: zero offsets


def test_empty_annotations_give_finite_loss_and_zero_regression():
    anchors, _ = make_batch()
    generator = torch.Generator().manual_seed(0)
    cls_logits = torch.randn(2, 3, 2, generator=generator, requires_grad=True)
    deltas = torch.randn(2, 3, 4, generator=generator, requires_grad=True)
    for annotations in (torch.full((2, 3, 5), -1.0), torch.zeros(2, 0, 5)):
        cls_loss, box_loss = loss_of(ModelSettings(num_classes=2))(cls_logits, deltas, anchors, annotations)
        assert torch.isfinite(cls_loss) and cls_loss > 0
        assert box_loss.item() == 0.0
        (cls_loss + box_loss).backward()


def test_giou_box_loss_and_ema_normalizer():
    anchors, annotations = make_batch()
    deltas = torch.zeros(2, 3, 4)
    deltas[0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # moves the box by 0.1 * 10 = 1 px in x
    loss = loss_of(ModelSettings(num_classes=2, box_loss="giou", loss_normalizer="ema", box_coder_std=YHENON_STD))
    _, box_loss = loss(torch.zeros(2, 3, 2), deltas, anchors, annotations)
    # Boxes [1, 0, 11, 10] and [0, 0, 10, 10]: IoU = 90 / 110, hull = 110 = union, so GIoU loss = 1 - 9/11.
    # EMA normaliser: 0.9 * 100 + 0.1 * 1 = 90.1 foreground anchors.
    torch.testing.assert_close(box_loss, torch.tensor((1 - 9 / 11) / 90.1))


def test_loss_rejects_unknown_options():
    with pytest.raises(ValueError, match="box_loss"):
        loss_of(ModelSettings(num_classes=2, box_loss="l2"))
    with pytest.raises(ValueError, match="loss_normalizer"):
        loss_of(ModelSettings(num_classes=2, loss_normalizer="none"))


def test_focal_loss_gradient_matches_autograd_through_torchvision():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 50, 6, generator=generator, dtype=torch.float64) * 5
    logits[0, :4] = torch.tensor([0.0, -60.0, 60.0, 1e-3], dtype=torch.float64)[:, None]  # z = 0 and far tails
    targets = (torch.rand(3, 50, 6, generator=generator) > 0.8).double()
    for alpha, gamma in [(0.25, 2.0), (-1, 0.0), (0.5, 1.5)]:
        ours = logits.clone().requires_grad_()
        theirs = logits.clone().requires_grad_()
        weights = torch.rand(3, 50, 6, generator=generator, dtype=torch.float64)  # a non-uniform upstream gradient
        (focal_loss(ours, targets, alpha, gamma) * weights).sum().backward()
        (sigmoid_focal_loss(theirs, targets, alpha, gamma, reduction="none") * weights).sum().backward()
        torch.testing.assert_close(ours.grad, theirs.grad)


def test_focal_loss_gradcheck():
    logits = torch.tensor([[-3.0, 0.0, 0.5], [2.0, -0.7, 8.0]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[True, False, True], [False, False, True]])
    assert torch.autograd.gradcheck(lambda x: focal_loss(x, targets, 0.25, 2.0), (logits,))


def reference_losses(cls_logits, box_deltas, anchors, annotations, settings):
    """The loss as computed before the batched rewrite, from torchvision's ops: per image, boxes matched through
    boolean-mask assignment, torchvision's sigmoid_focal_loss and generalized_box_iou_loss, PyTorch's smooth L1."""
    cls_total, box_total, num_foreground = 0.0, 0.0, 0
    for logits, deltas, rows in zip(cls_logits, box_deltas, annotations):
        rows = rows[rows[:, 4] >= 0]
        matches = torch.full((len(anchors),), BACKGROUND)
        if len(rows):
            iou = box_iou(rows[:, :4], anchors)  # (G, R)
            best_iou, best_box = iou.max(dim=0)
            matches = best_box.clone()
            matches[best_iou < settings.fg_iou] = IGNORED
            matches[best_iou < settings.bg_iou] = BACKGROUND
            if settings.allow_low_quality_matches:
                best_per_box = iou.max(dim=1, keepdim=True).values
                is_best = ((iou == best_per_box) & (best_per_box > 0)).any(dim=0)
                matches[is_best] = best_box[is_best]
        foreground = matches >= 0
        targets = torch.zeros_like(logits)
        targets[foreground, rows[matches[foreground], 4].long()] = 1.0
        counted = matches != IGNORED
        cls_total = cls_total + sigmoid_focal_loss(logits[counted], targets[counted], settings.focal_alpha,
                                                   settings.focal_gamma, reduction="sum")
        matched_boxes, foreground_anchors = rows[matches[foreground], :4], anchors[foreground]
        std = settings.box_coder_std
        if settings.box_loss == "giou":
            predicted = decode(foreground_anchors, deltas[foreground], std)
            box_total = box_total + generalized_box_iou_loss(predicted, matched_boxes, reduction="sum")
        else:
            targets = encode(foreground_anchors, matched_boxes, std)
            box_total = box_total + F.smooth_l1_loss(deltas[foreground], targets, beta=settings.smooth_l1_beta,
                                                     reduction="sum")
        num_foreground += int(foreground.sum())
    return cls_total / max(num_foreground, 1), box_total / max(num_foreground, 1)


def random_case(seed: int, batch: int = 3, num_anchors: int = 60, num_classes: int = 4, max_boxes: int = 5):
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(num_anchors, 2, generator=generator, dtype=torch.float64) * 80
    anchors = torch.cat([corners, corners + 4 + torch.rand(num_anchors, 2, generator=generator, dtype=torch.float64) * 40], 1)
    annotations = torch.full((batch, max_boxes, 5), -1.0, dtype=torch.float64)
    for image in range(batch - 1):  # the last image has no boxes
        count = int(torch.randint(1, max_boxes + 1, (), generator=generator))
        # boxes near anchors, so that every match state occurs
        boxes = anchors[torch.randint(num_anchors, (count,), generator=generator)]
        boxes = boxes + torch.randn(count, 4, generator=generator, dtype=torch.float64) * 3
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        labels = torch.randint(num_classes, (count, 1), generator=generator).double()
        annotations[image, :count] = torch.cat([boxes, labels], 1)
    cls_logits = (torch.randn(batch, num_anchors, num_classes, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    box_deltas = (torch.randn(batch, num_anchors, 4, generator=generator, dtype=torch.float64) * 0.3).requires_grad_()
    return cls_logits, box_deltas, anchors, annotations


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("options", [
    dict(), dict(box_loss="giou"), dict(box_coder_std=YHENON_STD, smooth_l1_beta=1 / 9),
    dict(allow_low_quality_matches=False, focal_alpha=0.5, focal_gamma=1.5),
])
def test_loss_equals_the_per_image_reference_values_and_gradients(seed, options):
    settings = ModelSettings(num_classes=4, **options)
    cls_logits, box_deltas, anchors, annotations = random_case(seed)
    ours = loss_of(settings)(cls_logits, box_deltas, anchors, annotations)
    theirs = reference_losses(cls_logits, box_deltas, anchors, annotations, settings)
    for mine, expected in zip(ours, theirs):
        torch.testing.assert_close(mine, expected)
        grads = torch.autograd.grad(mine, (cls_logits, box_deltas), allow_unused=True)
        expected_grads = torch.autograd.grad(expected, (cls_logits, box_deltas), allow_unused=True)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad if grad is not None else torch.zeros(()),
                                       expected_grad if expected_grad is not None else torch.zeros(()))


def test_the_whole_batch_at_once_equals_one_image_at_a_time():
    # A GPU takes the batch in one piece, a CPU one image at a time: the same sums.
    cls_logits, box_deltas, anchors, annotations = random_case(7, batch=4)
    settings = ModelSettings(num_classes=4)
    whole = summed_losses(cls_logits, box_deltas, annotations, anchors, settings)
    per_image = [summed_losses(*chunk, anchors, settings) for chunk in
                 zip(cls_logits.split(1), box_deltas.split(1), annotations.split(1))]
    for total, parts in zip(whole, zip(*per_image)):
        torch.testing.assert_close(total, sum(parts))


def test_batched_box_iou_and_generalized_iou_loss_equal_torchvision():
    _, box_deltas, anchors, annotations = random_case(3)
    boxes = annotations[0, :3, :4]
    torch.testing.assert_close(batched_box_iou(annotations[:1, :3, :4], anchors)[0], box_iou(boxes, anchors))
    predicted = decode(anchors[:3], box_deltas[0, :3].detach(), (1.0, 1.0, 1.0, 1.0))
    torch.testing.assert_close(generalized_iou_loss(predicted, boxes),
                               generalized_box_iou_loss(predicted, boxes, reduction="none"))
