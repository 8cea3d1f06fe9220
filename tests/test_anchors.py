import math

import pytest
import torch

from retinanet.anchors import Anchors, base_anchors
from retinanet.settings import ModelSettings

ROOT_HALF = math.sqrt(0.5)
PAPER = ModelSettings(num_classes=1)  # the paper's anchors


def test_base_anchors_of_p3_by_hand():
    # size 32, scale 1: area 32². Aspect ratio r = h / w gives w = 32 / sqrt(r), h = 32 * sqrt(r).
    base = base_anchors(32, (0.5, 1.0, 2.0), (1.0,))
    w_wide, h_wide = 32 / ROOT_HALF, 32 * ROOT_HALF  # r = 1/2: 45.25 x 22.63
    expected = torch.tensor(
        [
            [-w_wide / 2, -h_wide / 2, w_wide / 2, h_wide / 2],  # 1:2
            [-16.0, -16.0, 16.0, 16.0],  # 1:1
            [-h_wide / 2, -w_wide / 2, h_wide / 2, w_wide / 2],  # 2:1, the transpose of 1:2
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(base, expected)


def test_anchors_of_a_small_image_by_hand():
    levels = Anchors(PAPER).per_level(32, 40)
    # P3: stride 8, grid ceil(32/8) x ceil(40/8) = 4 x 5; P4: 2 x 3; P5: 1 x 2; P6, P7: 1 x 1 (ceil)
    assert [level.shape[0] for level in levels] == [9 * 20, 9 * 6, 9 * 2, 9, 9]
    p3, p4, p5 = levels[0], levels[1], levels[2]
    # First P3 cell is centred at (0.5 * 8, 0.5 * 8) = (4, 4); the 1:1 anchor of scale 2^0 is 32 wide.
    torch.testing.assert_close(p3[3], torch.tensor([4.0 - 16, 4.0 - 16, 4.0 + 16, 4.0 + 16]))
    # 1:1, scale 2^(1/3): side 32 * 2^(1/3) = 40.317
    side = 32 * 2 ** (1 / 3)
    torch.testing.assert_close(p3[4], torch.tensor([4 - side / 2] * 2 + [4 + side / 2] * 2))
    # Row-major: anchors 9..17 belong to cell (y=0, x=1), centred at (12, 4); cell (y=1, x=0) starts at 9*5 = 45.
    torch.testing.assert_close(p3[9 + 3], torch.tensor([-4.0, -12.0, 28.0, 20.0]))
    torch.testing.assert_close(p3[45 + 3], torch.tensor([-12.0, -4.0, 20.0, 28.0]))
    # P4 stride 16, size 64: cell (0, 0) centred at (8, 8); P5 stride 32, size 128: centred at (16, 16).
    torch.testing.assert_close(p4[3], torch.tensor([-24.0, -24.0, 40.0, 40.0]))
    torch.testing.assert_close(p5[3], torch.tensor([-48.0, -48.0, 80.0, 80.0]))


@pytest.mark.parametrize("height,width", [(32, 32), (100, 70), (160, 160), (800, 1216), (1, 1), (513, 257)])
def test_anchor_count_formula(height, width):
    total = sum(level.shape[0] for level in Anchors(PAPER).per_level(height, width))
    expected = 9 * sum(math.ceil(height / 2**l) * math.ceil(width / 2**l) for l in range(3, 8))
    assert total == expected


def test_anchors_follow_input_and_are_cached():
    anchors = Anchors(PAPER)
    images = torch.zeros(2, 3, 64, 96, dtype=torch.bfloat16)
    first = anchors(images)
    assert first.dtype == torch.float32 and first.device == images.device  # float32 under mixed precision too
    assert anchors(images) is first  # cached: the same tensor
    assert torch.equal(first, torch.cat(anchors.per_level(64, 96)))
    assert anchors.num_per_level(64, 96) == [len(level) for level in anchors.per_level(64, 96)]


def test_anchor_cache_is_bounded():
    anchors = Anchors(PAPER, max_cached=2)
    for size in (32, 64, 96):
        anchors.for_size(size, size)
    assert len(anchors._cache) == 2


def test_centre_offset_zero_moves_anchors_to_the_cell_corner():
    p3 = Anchors(PAPER.replace(anchor_centre_offset=0.0)).per_level(32, 32)[0]
    torch.testing.assert_close(p3[3], torch.tensor([-16.0, -16.0, 16.0, 16.0]))


def test_any_number_of_scales_and_ratios_and_other_sizes():
    anchors = Anchors(PAPER.replace(anchor_sizes=(16, 32, 64, 128, 256), anchor_scales=(1.0, 1.5, 2.0, 3.0),
                                     anchor_ratios=(0.25, 0.5, 1, 2, 4)))
    assert anchors.num_anchors == 20
    p3 = anchors.per_level(16, 16)[0]  # 2 x 2 cells of 20 anchors
    assert p3.shape == (2 * 2 * 20, 4)
    # cell (0, 0) centred at (4, 4); ratio 1 (the third), scale 1.5 (the second): a square of side 16 * 1.5 = 24
    torch.testing.assert_close(p3[2 * 4 + 1], torch.tensor([4 - 12.0, 4 - 12.0, 4 + 12.0, 4 + 12.0]))
