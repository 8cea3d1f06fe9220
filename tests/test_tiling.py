"""Tests of retinanet/engine/tiling.py (where tiles lie: tests/test_tiles.py): which cut boxes are dropped and how
tiles merge (by hand), the windows a dataset cuts, images that cannot be read, and tiled prediction on a 2400 x 1800
image of 40 small objects with a detector that finds them from the pixels alone (tests/small_objects.py).
tests/test_predict.py measures the same with a RetinaNet trained on such objects."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from small_objects import CLASS_NAMES, BrightBlobDetector, save_scene, scatter_objects
from torchvision.ops import box_iou

from retinanet.data import tiles
from retinanet.dataloader import resize_image
from retinanet.evaluation import predict_dataset
from retinanet.extras import tiling

LARGE_HEIGHT, LARGE_WIDTH = 1800, 2400
TILE, OVERLAP = 256, 0.5  # tiles of 256 pixels seen by a model of min_size 64 at scale 1/4; 128-pixel overlaps


# ------------------------------------------------------------------------------------------------------ tiles


@pytest.mark.parametrize("tile_size, overlap", [(0, 0.25), (400, 1.0), (400, -0.1)])
def test_bad_tile_size_or_overlap_is_a_value_error(tile_size, overlap):
    with pytest.raises(ValueError, match="overlap in \\[0, 1\\)"):
        tiling.ImageWindows([torch.zeros((3, 8, 8), dtype=torch.uint8)], 64, 64, tile_size, overlap)


# ---------------------------------------------------------------------------------------------------- merging


def test_a_cut_box_is_dropped_only_where_another_tile_holds_it_whole():
    tiles = torch.tensor([[0.0, 0.0, 100.0, 100.0], [60.0, 0.0, 160.0, 100.0]])  # of an image 100 high, 160 wide
    # Interiors with a margin of 2 on the sides inside the image: (0, 0, 98, 100) and (62, 0, 160, 100).
    boxes = torch.tensor([
        [70.0, 10.0, 100.0, 30.0],  # tile 0, cut at x = 100, inside tile 1's interior: dropped
        [60.0, 40.0, 90.0, 60.0],  # tile 1, cut at x = 60, inside tile 0's interior: dropped
        [20.0, 20.0, 40.0, 40.0],  # tile 0, away from every side: kept
        [40.0, 50.0, 100.0, 70.0],  # tile 0, cut, but wider than the overlap (starts before x = 62): kept
        [150.0, 80.0, 160.0, 100.0],  # tile 1, on the image's own edges only: kept
        [99.0, 70.0, 100.0, 80.0],  # tile 0, a sliver at its cut side: dropped
        [61.0, 80.0, 80.0, 95.0],  # tile 1, within the margin of its cut side, inside tile 0's interior: dropped
    ])
    tile_of_box = torch.tensor([0, 1, 0, 0, 1, 0, 1])
    dropped = tiling.held_whole_elsewhere(boxes, tile_of_box, tiles, (100, 160), margin=2.0)
    assert dropped.tolist() == [True, True, False, False, False, True, True]


def test_tiles_merge_into_image_pixels_without_cut_boxes_by_class_wise_nms():
    windows = [tiling.Window(0, (0, 0, 100, 100), 0.5), tiling.Window(0, (60, 0, 160, 100), 0.5)]
    def prediction(boxes, scores, labels):  # in the tile's pixels, as predict_dataset gives them
        return {"boxes": np.array(boxes, np.float32), "scores": np.array(scores, np.float32),
                "labels": np.array(labels), "image_size": (100, 100)}
    tile_0 = prediction([[70, 10, 100, 30], [20, 20, 40, 40], [65, 60, 85, 80], [65, 60, 85, 80]],
                        [0.8, 0.9, 0.65, 0.3], [0, 1, 1, 0])
    tile_1 = prediction([[10, 10, 50, 30], [5, 60, 25, 80]], [0.7, 0.6], [0, 1])  # (70, 10, 110, 30), (65, 60, 85, 80)
    merged = tiling.merge_tiles(windows, [tile_0, tile_1], (100, 160), nms_threshold=0.5)
    # Tile 0's 0.8 box is cut at x = 100 and tile 1 holds it whole (margin 2 / 0.5 = 4 pixels): without the rule it
    # would suppress the whole box (IoU 30 / 40 = 0.75). The object inside both tiles is kept once, from tile 0 (0.65
    # > 0.6); the box of another class at the same place stays.
    assert merged["boxes"].tolist() == [[20, 20, 40, 40], [70, 10, 110, 30], [65, 60, 85, 80], [65, 60, 85, 80]]
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.7, 0.65, 0.3])
    assert merged["labels"].tolist() == [1, 0, 1, 0] and merged["image_size"] == (100, 160)


# ---------------------------------------------------------------------------------------------------- windows


def test_windows_are_tiles_of_large_images_and_whole_small_ones_at_the_models_scale():
    large = torch.randint(0, 256, (3, 200, 300), dtype=torch.uint8)
    small = torch.randint(0, 256, (3, 50, 100), dtype=torch.uint8)
    dataset = tiling.ImageWindows([large, small], min_size=64, max_size=64, tile_size=128, overlap=0.25)
    # Rows start at 0, 72 (72 / 96 -> 1 step), columns at 0, 86, 172 (172 / 96 -> 2 steps); every tile at 64 / 128.
    assert [window.box for window in dataset.windows[:6]] == [
        (0, 0, 128, 128), (86, 0, 214, 128), (172, 0, 300, 128),
        (0, 72, 128, 200), (86, 72, 214, 200), (172, 72, 300, 200),
    ]
    item = dataset[4]
    assert item["scale"] == 0.5 and item["original_size"] == (128, 128) and dataset.image_sizes[4] == (128, 128)
    assert torch.equal(item["image"], resize_image(large[:, 72:200, 86:214], 0.5))  # (3, 64, 64)
    # The small image is one window, resized as without tiling: its longer side 100 to max_size 64
    assert dataset.windows[6] == tiling.Window(1, (0, 0, 100, 50), 0.64)
    assert dataset[6]["image"].shape == (3, 32, 64) and dataset[6]["original_size"] == (50, 100)
    assert len(tiling.ImageWindows([large, small], 64, 64)) == 2  # without a tile size, both whole


def truncated_png(path) -> str:
    """A PNG cut in half: its header (and size) reads, its pixels do not."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return str(path)


def test_unreadable_images_are_skipped_and_said_why(tmp_path):
    good = save_scene(str(tmp_path / "good.png"), 96, 96, [(20, 20, 50, 50, 0)], seed=0)
    (tmp_path / "text.png").write_text("not an image")
    images = [good, str(tmp_path / "text.png"), truncated_png(tmp_path / "truncated.png"), str(tmp_path / "gone.png")]
    dataset = tiling.ImageWindows(images, 96, 96)
    assert sorted(dataset.unreadable) == [1, 3] and "gone.png: image file not found" in dataset.unreadable[3]
    assert [window.image for window in dataset.windows] == [0, 2]
    assert dataset[1]["original_size"] == (0, 0)  # the truncated image's placeholder
    predictions = tiling.predict_windows(BrightBlobDetector().eval(), dataset)
    assert predictions[1:] == [None, None, None]
    assert predictions[0]["boxes"].tolist() == [[20, 20, 50, 50]] and predictions[0]["labels"].tolist() == [0]
    assert dataset.undecodable_reason(2).endswith("truncated.png: cannot decode image: image file is truncated")
    save_scene(images[2], 64, 64, [], seed=0)  # written whole after the loading process failed on it
    assert dataset.undecodable_reason(2).endswith("truncated.png: could not be decoded while predicting, though it "
                                                  "can now (was it being written?)")
    with pytest.raises(ValueError, match="text.png: cannot decode image"):
        tiling.predict_tiled(BrightBlobDetector().eval(), images[1], 64)


# ----------------------------------------------------------------------------------------- tiled prediction


def matches(objects: list[tuple], prediction: dict[str, np.ndarray], min_iou: float) -> torch.Tensor:
    """(G,) how many detections of its class overlap each object by at least min_iou."""
    boxes = torch.tensor([box[:4] for box in objects], dtype=torch.float32)  # (G, 4)
    iou = box_iou(boxes, torch.from_numpy(prediction["boxes"]))  # (G, D)
    same_class = torch.tensor([box[4] for box in objects])[:, None] == torch.from_numpy(prediction["labels"])[None]
    return ((iou >= min_iou) & same_class).sum(dim=1)


@pytest.fixture(scope="module")
def large_scene(tmp_path_factory) -> tuple[str, list[tuple]]:
    """A 2400 x 1800 image of 40 objects of 80-120 pixels, and the objects (x1, y1, x2, y2, class)."""
    objects = scatter_objects(np.random.default_rng(7), LARGE_HEIGHT, LARGE_WIDTH, 40)
    path = save_scene(str(tmp_path_factory.mktemp("large") / "large.png"), LARGE_HEIGHT, LARGE_WIDTH, objects, seed=7)
    return path, objects


def test_tiled_prediction_finds_every_small_object_once_where_the_whole_image_shows_none(large_scene):
    path, objects = large_scene
    windows = torch.tensor(tiles.tile_windows(LARGE_HEIGHT, LARGE_WIDTH, TILE, OVERLAP), dtype=torch.float32)
    boxes = torch.tensor([box[:4] for box in objects], dtype=torch.float32)
    crossings = (box_iou(boxes, windows) > 0) & ~tiling.contains(windows[None], boxes[:, None])  # (G, N)
    assert len(objects) == 40 and crossings.any(dim=1).sum() == 39  # all but one straddle some tile's side
    detector = BrightBlobDetector().eval()  # min_size = max_size = 64
    tiled = tiling.predict_tiled(detector, path, TILE, OVERLAP)
    assert matches(objects, tiled, 0.8).tolist() == [1] * 40 and len(tiled["scores"]) == 40  # once, nothing else
    assert tiled["image_size"] == (LARGE_HEIGHT, LARGE_WIDTH) and set(tiled["labels"].tolist()) == {0, 1}
    whole = tiling.predict_windows(detector, tiling.ImageWindows([path], 64, 64))[0]  # 2400 x 1800 -> 64 x 48
    assert len(whole["scores"]) == 0  # objects of 2-3 pixels: too small to see


def test_an_image_no_larger_than_a_tile_is_predicted_whole(tmp_path):
    objects = [(10, 10, 40, 40, 0), (60, 20, 90, 50, 1)]
    path = save_scene(str(tmp_path / "small.png"), 100, 120, objects, seed=1)
    detector = BrightBlobDetector(min_size=100, max_size=120).eval()
    dataset = tiling.ImageWindows([path], 100, 120)
    whole = predict_dataset(detector, dataset)[0]
    for image in (path, torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)):
        tiled = tiling.predict_tiled(detector, image, tile_size=200)
        assert all(np.array_equal(tiled[key], whole[key]) for key in ("boxes", "scores", "labels"))
    assert whole["boxes"].tolist() == [[10, 10, 40, 40], [60, 20, 90, 50]]
    assert [CLASS_NAMES[label] for label in whole["labels"]] == ["disc", "square"]
