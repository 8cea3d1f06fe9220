"""Training tiles (retinanet/data/tiles.py, tools/make_tiles.py): where tiles lie and which boxes each keeps, by
hand; a large annotated image, as CSV and as VOC, cut into tiles whose files and boxes match a hand count; images
past Pillow's pixel limit refused unless asked; and csv_eval.py --tile scoring a model on the large image."""

import csv

import numpy as np
import pytest
from conftest import write
from PIL import Image
from small_objects import BrightBlobDetector, save_scene
from test_interop import load_tool

import csv_eval

from retinanet.data import tiles
from retinanet.dataloader import CSVDataset
from retinanet.evaluation import evaluate
from retinanet.extras.tiling import ImageWindows, predict_windows


# ------------------------------------------------------------------------------------------------ windows


def test_tiles_overlap_by_at_least_the_fraction_asked_and_end_flush_with_the_image():
    assert tiles.tile_starts(1000, 400, 0.25) == [0, 300, 600]  # (1000 - 400) / (400 * 0.75) = 2 steps of 300
    assert tiles.tile_starts(1001, 400, 0.25) == [0, 200, 401, 601]  # 601 / 300 -> 3 steps of 200.33
    assert tiles.tile_starts(800, 400, 0.0) == [0, 400]  # side by side
    assert tiles.tile_starts(400, 400, 0.25) == [0] and tiles.tile_starts(250, 400, 0.25) == [0]
    assert tiles.tile_starts(2400, 384, 0.4) == list(range(0, 2017, 224))  # 2016 / 230.4 -> 9 steps of 224


def test_tile_windows_run_row_by_row_and_are_as_low_as_a_low_image():
    assert tiles.tile_windows(500, 1000, 400, 0.25) == [
        (0, 0, 400, 400), (300, 0, 700, 400), (600, 0, 1000, 400),
        (0, 100, 400, 500), (300, 100, 700, 500), (600, 100, 1000, 500),
    ]
    assert tiles.tile_windows(300, 1000, 400, 0.25) == [(0, 0, 400, 300), (300, 0, 700, 300), (600, 0, 1000, 300)]


# -------------------------------------------------------------------------------------------------- boxes


def test_a_tile_keeps_whole_boxes_and_cut_ones_with_enough_of_their_area_inside_clipped():
    boxes = np.array([
        [120, 130, 160, 170, 0],  # inside: kept as it is
        [80, 150, 120, 190, 1],  # 20 of its 40 columns inside: half its area, kept clipped
        [70, 150, 110, 190, 0],  # 10 of 40 inside: a quarter, left out
        [290, 290, 330, 330, 1],  # 10 x 10 of 40 x 40 inside: left out
        [250, 280, 270, 320, 1],  # 20 of its 40 rows inside: kept clipped
        [400, 400, 450, 450, 0],  # outside: not counted
    ], dtype=np.float32)
    seen = tiles.tile_boxes(boxes, (100, 100, 300, 300), min_visible=0.5)
    assert seen.boxes.tolist() == [[20, 30, 60, 70, 0], [0, 50, 20, 90, 1], [150, 180, 170, 200, 1]]
    assert (seen.whole, seen.clipped, seen.left_out) == (1, 2, 2)
    lenient = tiles.tile_boxes(boxes, (100, 100, 300, 300), min_visible=0.25)
    assert lenient.boxes[:, 4].tolist() == [0, 1, 0, 1] and (lenient.clipped, lenient.left_out) == (3, 1)


@pytest.mark.parametrize("min_visible", [0.0, 1.5])
def test_min_visible_is_a_fraction_of_a_box(min_visible):
    with pytest.raises(ValueError, match="min_visible"):
        tiles.check_min_visible(min_visible)


# ------------------------------------------------------------------------------------ a large annotated image

WIDTH, HEIGHT, TILE = 1000, 700, 400  # tiles start at x 0, 300, 600 and y 0, 300: six tiles
OBJECTS = [  # x1, y1, x2, y2, class; class 0 "disc", 1 "square" (small_objects draws them)
    (50, 50, 150, 150, 0),  # whole in tile (0, 0) only
    (320, 320, 380, 380, 1),  # in the overlap of four tiles: whole in (0, 0), (300, 0), (0, 300), (300, 300)
    (680, 100, 760, 140, 0),  # whole in (600, 0); a quarter in (300, 0): left out there
    (560, 500, 640, 560, 1),  # whole in (300, 300); half in (600, 300): kept clipped there
]
EXPECTED_ROWS = {  # by hand, in the tiles' pixels
    "large_x0_y0.png": [(50, 50, 150, 150, "disc"), (320, 320, 380, 380, "square")],
    "large_x300_y0.png": [(20, 320, 80, 380, "square")],
    "large_x600_y0.png": [(80, 100, 160, 140, "disc")],
    "large_x0_y300.png": [(320, 20, 380, 80, "square")],
    "large_x300_y300.png": [(20, 20, 80, 80, "square"), (260, 200, 340, 260, "square")],
    "large_x600_y300.png": [(0, 200, 40, 260, "square")],
    "small_x0_y0.png": [],  # an image without objects, smaller than a tile: one tile of its own size
}


@pytest.fixture()
def annotated(tmp_path):
    """The large image and an empty small one, annotated in CSV: (annotations CSV, classes CSV)."""
    save_scene(str(tmp_path / "large.png"), HEIGHT, WIDTH, OBJECTS, seed=3)
    save_scene(str(tmp_path / "small.png"), 200, 300, [], seed=4)
    rows = "".join(f"large.png,{x1},{y1},{x2},{y2},{('disc', 'square')[label]}\n" for x1, y1, x2, y2, label in OBJECTS)
    return (str(write(tmp_path / "large.csv", rows + "small.png,,,,,\n")),
            str(write(tmp_path / "classes.csv", "disc,0\nsquare,1\n")))


def read_rows(path) -> dict[str, list[tuple]]:
    """A training CSV as {tile file name: [(x1, y1, x2, y2, class_name), ...]}."""
    found: dict[str, list[tuple]] = {}
    with open(path, newline="") as file:
        for tile, *box in csv.reader(file):
            found.setdefault(tile.removeprefix("images/"), [])
            if box[0]:
                found[tile.removeprefix("images/")].append((*(int(float(v)) for v in box[:4]), box[4]))
    return found


def test_a_large_image_is_cut_into_tiles_whose_boxes_match_a_hand_count(annotated, tmp_path, capsys):
    annotations, classes = annotated
    flags = ["--csv_train", annotations, "--classes", classes, "--tile_size", str(TILE),
             "--output_dir", str(tmp_path / "tiles")]
    assert load_tool("make_tiles").main(flags) == 0
    assert read_rows(tmp_path / "tiles" / "train.csv") == EXPECTED_ROWS
    out = capsys.readouterr().out
    assert "cut 2 images into 7 tiles of 400 x 400 pixels" in out and "1 of them without a box" in out
    assert "7 boxes whole, 1 cut by a tile's edge and kept clipped" in out and "1 cut and left out" in out
    large = np.array(Image.open(tmp_path / "large.png"))
    assert np.array_equal(np.array(Image.open(tmp_path / "tiles" / "images" / "large_x600_y300.png")),
                          large[300:700, 600:1000])  # the tile is the image's pixels, not resized
    assert Image.open(tmp_path / "tiles" / "images" / "small_x0_y0.png").size == (300, 200)
    dataset = CSVDataset(str(tmp_path / "tiles" / "train.csv"), str(tmp_path / "tiles" / "classes.csv"))
    assert len(dataset) == 7 and sum(len(dataset.load_annotations(i)) for i in range(7)) == 8  # trainable as it is


def test_skip_empty_and_a_lower_min_visible_change_the_tiles_as_stated(annotated, tmp_path):
    annotations, classes = annotated
    flags = ["--csv_train", annotations, "--classes", classes, "--tile_size", str(TILE),
             "--output_dir", str(tmp_path / "tiles"), "--skip_empty", "--min_visible", "0.25"]
    assert load_tool("make_tiles").main(flags) == 0
    rows = read_rows(tmp_path / "tiles" / "train.csv")
    assert "small_x0_y0.png" not in rows and not (tmp_path / "tiles" / "images" / "small_x0_y0.png").exists()
    assert rows["large_x300_y0.png"] == [(20, 320, 80, 380, "square"), (380, 100, 400, 140, "disc")]  # a quarter


def test_voc_annotations_give_the_same_tiles(tmp_path):
    (tmp_path / "voc").mkdir()
    save_scene(str(tmp_path / "voc" / "large.png"), HEIGHT, WIDTH, OBJECTS, seed=3)
    objects = "".join(  # VOC's 1-based pixel indices: xmin = x1 + 1, xmax = x2
        f"<object><name>{('disc', 'square')[label]}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1}</xmin>"
        f"<ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>\n"
        for x1, y1, x2, y2, label in OBJECTS)
    write(tmp_path / "voc" / "large.xml", f"<annotation>\n<filename>large.png</filename>\n{objects}</annotation>\n")
    write(tmp_path / "classes.csv", "disc,0\nsquare,1\n")
    flags = ["--voc_path", str(tmp_path / "voc"), "--classes", str(tmp_path / "classes.csv"),
             "--tile_size", str(TILE), "--output_dir", str(tmp_path / "tiles")]
    assert load_tool("make_tiles").main(flags) == 0
    expected = {name: rows for name, rows in EXPECTED_ROWS.items() if name.startswith("large")}
    assert read_rows(tmp_path / "tiles" / "train.csv") == expected


def test_images_past_the_pixel_limit_are_cut_only_when_asked(annotated, tmp_path, monkeypatch, capsys):
    annotations, classes = annotated
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # the 700,000 pixels of the large image are too many
    flags = ["--csv_train", annotations, "--classes", classes, "--tile_size", str(TILE),
             "--output_dir", str(tmp_path / "tiles")]
    assert load_tool("make_tiles").main(flags) == 2
    assert "decompression bomb" in capsys.readouterr().err
    assert load_tool("make_tiles").main(flags + ["--allow_large_images"]) == 0
    assert read_rows(tmp_path / "tiles" / "train.csv") == EXPECTED_ROWS


def test_two_images_of_the_same_name_are_refused(tmp_path):
    images = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        images.append((save_scene(str(tmp_path / folder / "site.png"), 100, 100, [], seed=0), np.zeros((0, 5))))
    with pytest.raises(ValueError, match=r"tiles of the same name: \['site'\]"):
        tiles.cut_into_tiles(images, ["disc"], str(tmp_path / "tiles"), 64)


# --------------------------------------------------------------------------------------- evaluating tiled


def test_tiled_evaluation_scores_the_large_image_in_its_own_pixels(annotated, tmp_path, capsys):
    annotations, classes = annotated
    dataset = CSVDataset(annotations, classes)
    detector = BrightBlobDetector(min_size=128, max_size=128).eval()  # sees blobs of 12 to 64 pixels
    windows = ImageWindows(dataset.image_paths, 128, 128, tile_size=256, overlap=0.5)  # tiles at scale 1/2
    predictions = predict_windows(detector, windows)
    assert predictions[0]["image_size"] == (HEIGHT, WIDTH) and len(predictions[0]["scores"]) == len(OBJECTS)
    assert evaluate(predictions, dataset)["mAP"] == 1.0
    whole = evaluate(predict_windows(detector, ImageWindows(dataset.image_paths, 128, 128)), dataset)
    assert whole["mAP"] < 0.5  # the whole image at 128 pixels: objects of 5 to 13 pixels


def test_csv_eval_takes_tile_flags(trained_shapes_run, annotated, tmp_path, capsys):
    classes = write(tmp_path / "shape_classes.csv", "".join(
        f"{name},{index}\n" for index, name in enumerate(("circle", "rectangle", "triangle", "ellipse", "star"))))
    rows = "".join(f"large.png,{x1},{y1},{x2},{y2},circle\n" for x1, y1, x2, y2, _ in OBJECTS) + "small.png,,,,,\n"
    shapes_annotations = write(tmp_path / "shapes_large.csv", rows)
    flags = ["--csv_val", str(shapes_annotations), "--classes", str(classes), "--model",
             trained_shapes_run.checkpoint, "--tile_size", "300", "--tile_overlap", "0.3", "--device", "cpu"]
    assert csv_eval.main(flags) == 0
    out = capsys.readouterr().out
    assert "those larger than 300 x 300 pixels cut into tiles" in out and "mAP:" in out
    with pytest.raises(SystemExit):
        csv_eval.main(flags[:6] + ["--tile_overlap", "0.3"])
    assert "--tile_overlap needs --tile" in capsys.readouterr().err
