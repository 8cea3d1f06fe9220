import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from retinanet import dataloader
from retinanet.dataloader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AspectRatioBatchSampler,
    CocoDataset,
    CSVDataset,
    Normalize,
    RandomHorizontalFlip,
    Resize,
    build_transform,
    collate,
    make_shapes_dataset,
    read_class_list,
    read_rgb_image,
)

CLASSES = "cat,0\ndog,1\n"


def save_image(path, width, height, color=(200, 100, 50)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)
    return path


def write(path, text, bom=False, crlf=False):
    if crlf:
        text = text.replace("\n", "\r\n")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------------------ CSV format


def test_csv_good_file_with_bom_crlf_quoted_path_floats_and_an_empty_image(tmp_path):
    save_image(tmp_path / "my dir" / "a, b.png", width=40, height=30)
    save_image(tmp_path / "empty.png", width=20, height=50)
    classes = write(tmp_path / "classes.csv", "dog,1\ncat,0\n", bom=True, crlf=True)
    rows = '"my dir/a, b.png",1.5,2,10.25,20,dog\n"my dir/a, b.png",0,0,5,5,cat\nempty.png,,,,,\n'
    annotations = write(tmp_path / "train.csv", rows, bom=True, crlf=True)

    dataset = CSVDataset(str(annotations), str(classes))

    assert dataset.class_names == ["cat", "dog"]
    assert dataset.num_classes == 2
    assert len(dataset) == 2
    assert dataset.image_path(0) == str(tmp_path / "my dir" / "a, b.png")
    expected = np.array([[1.5, 2, 10.25, 20, 1], [0, 0, 5, 5, 0]], dtype=np.float32)
    np.testing.assert_array_equal(dataset.load_annotations(0), expected)
    assert dataset.load_annotations(1).shape == (0, 5)
    assert dataset.aspect_ratio(0) == 40 / 30
    assert dataset.aspect_ratio(1) == 20 / 50


def test_csv_item_is_normalised_rgb_with_annotations(tmp_path):
    save_image(tmp_path / "a.png", width=40, height=30, color=(255, 0, 51))
    save_image(tmp_path / "b.png", width=20, height=50)
    classes = write(tmp_path / "classes.csv", CLASSES)
    annotations = write(tmp_path / "train.csv", f"a.png,1,2,10,20,dog\n{tmp_path / 'b.png'},,,,,\n")  # absolute
    dataset = CSVDataset(str(annotations), str(classes))

    item = dataset[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 30, 40)
    expected_pixel = [(1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1],
                      (0.2 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]]  # 51 / 255 = 0.2
    torch.testing.assert_close(item["image"][:, 7, 9], torch.tensor(expected_pixel))
    torch.testing.assert_close(item["annotations"], torch.tensor([[1.0, 2.0, 10.0, 20.0, 1.0]]))
    assert item["scale"] == 1.0 and item["index"] == 0 and item["original_size"] == (30, 40)
    empty = dataset[1]
    assert empty["annotations"].shape == (0, 5) and empty["annotations"].dtype == torch.float32
    assert empty["original_size"] == (50, 20) and empty["index"] == 1


ANNOTATION_ERRORS = [
    # (rows, line, what the message says)
    ("a.png,1,2,3,4\n", 1, "5 columns, expected 6"),
    ("a.png,1,2,3,4,cat\na.png,1,x,3,4,cat\n", 2, "y1 'x' is not a number"),
    ("a.png,1,2,3,4,cat\n\na.png,1,2,3,4y,cat\n", 3, "y2 '4y' is not a number"),  # blank line 2 still counts
    ("a.png,1,2,3,4,cat\na.png,-1,2,3,4,cat\n", 2, "expected a finite number >= 0"),
    ("a.png,nan,2,3,4,cat\n", 1, "x1 is 'nan'"),
    ("a.png,1,2,3,inf,cat\n", 1, "y2 is 'inf'"),
    ("a.png,5,2,5,4,cat\n", 1, "expected x2 > x1 and y2 > y1"),
    ("a.png,1,4,3,2.5,cat\n", 1, "expected x2 > x1 and y2 > y1"),
    ("a.png,1,2,3,4,cat\nb.png,1,2,3,4,bird\n", 2, "unknown class 'bird'"),
    ("a.png,1,,,,\n", 1, "some fields are empty"),
    (",1,2,3,4,cat\n", 1, "empty image path"),
    ("path,x1,y1,x2,y2,class_name\na.png,1,2,3,4,cat\n", 1, "no header row"),
    ("", 1, "the file is empty"),
    ("\n\n", 1, "the file is empty"),
]


@pytest.mark.parametrize("rows, line, message", ANNOTATION_ERRORS)
def test_csv_annotation_errors_name_file_and_line(tmp_path, rows, line, message):
    classes = write(tmp_path / "classes.csv", CLASSES)
    annotations = write(tmp_path / "train.csv", rows)
    with pytest.raises(ValueError) as error:
        CSVDataset(str(annotations), str(classes))
    assert f"{annotations}, line {line}:" in str(error.value)
    assert message in str(error.value)


CLASS_ERRORS = [
    ("cat,0,extra\n", 1, "3 columns, expected 2"),
    ("cat,0\ncat,1\n", 2, "duplicate class name 'cat'"),
    ("cat,0\ndog,0\n", 2, "duplicate class id 0 (also on line 1)"),
    ("cat,0\ndog,1.5\n", 2, "class id '1.5' is not an integer"),
    ("cat,0\ndog,two\n", 2, "class id 'two' is not an integer"),
    ("cat,0\ndog,2\n", 2, "class id 2 out of range: the 2 ids must be 0..1, each once (missing: [1])"),
    ("cat,-1\n", 1, "class id -1 out of range"),
    ("cat,0\n,1\n", 2, "empty class name"),
    ("", 1, "the file is empty"),
    ("class_name,id\ncat,0\n", 1, "no header row"),
]


@pytest.mark.parametrize("rows, line, message", CLASS_ERRORS)
def test_csv_class_list_errors_name_file_and_line(tmp_path, rows, line, message):
    classes = write(tmp_path / "classes.csv", rows)
    with pytest.raises(ValueError) as error:
        read_class_list(str(classes))
    assert f"{classes}, line {line}:" in str(error.value)
    assert message in str(error.value)


def test_csv_missing_images_are_listed_at_construction(tmp_path):
    save_image(tmp_path / "a.png", 10, 10)
    classes = write(tmp_path / "classes.csv", CLASSES)
    annotations = write(tmp_path / "train.csv", "a.png,1,2,3,4,cat\ngone.png,1,2,3,4,cat\nlost.png,,,,,\n")
    with pytest.raises(ValueError, match="2 of 3 image files not found") as error:
        CSVDataset(str(annotations), str(classes))
    assert f"line 2: {tmp_path / 'gone.png'}" in str(error.value)
    assert f"line 3: {tmp_path / 'lost.png'}" in str(error.value)


def test_boxes_are_clipped_to_the_image_and_vanished_ones_dropped_with_a_warning(tmp_path):
    image = save_image(tmp_path / "a.png", width=40, height=30)
    classes = write(tmp_path / "classes.csv", CLASSES)
    annotations = write(tmp_path / "train.csv", "a.png,30,5,60,20,cat\na.png,45,5,60,20,dog\n")
    dataset = CSVDataset(str(annotations), str(classes))
    with pytest.warns(UserWarning, match=f"{image}: dropped 1 box"):
        item = dataset[0]
    torch.testing.assert_close(item["annotations"], torch.tensor([[30.0, 5.0, 40.0, 20.0, 0.0]]))


# ------------------------------------------------------------------------------------------------------ COCO


def write_coco(root, set_name, layout="images"):
    image_dir = root / "images" / set_name if layout == "images" else root / set_name
    save_image(image_dir / "a.png", width=40, height=30)
    save_image(image_dir / "b.png", width=20, height=50)
    save_image(image_dir / "c.png", width=10, height=10)
    coco = {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 5, "file_name": "b.png", "width": 20, "height": 50},  # no annotations: a negative
            {"id": 12, "file_name": "c.png", "width": 10, "height": 10},  # only a crowd box
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [1, 2, 10, 20], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0},
            {"id": 3, "image_id": 10, "category_id": 7, "bbox": [0, 0, 30, 30], "area": 900, "iscrowd": 1},
            {"id": 4, "image_id": 10, "category_id": 3, "bbox": [3, 3, 0, 4], "area": 0, "iscrowd": 0},
            {"id": 5, "image_id": 12, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 1},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / f"instances_{set_name}.json").write_text(json.dumps(coco))


def test_coco_maps_category_ids_skips_crowd_and_zero_area_keeps_negatives(tmp_path):
    write_coco(tmp_path, "val")
    with pytest.warns(UserWarning, match=r"dropped 1 zero-area box\(es\), annotation ids \[4\]"):
        dataset = CocoDataset(str(tmp_path), "val")

    assert dataset.image_ids == [5, 10, 12]
    assert dataset.coco_id_to_label == {3: 0, 7: 1}
    assert dataset.label_to_coco_id == {0: 3, 1: 7}
    assert dataset.class_names == ["cat", "dog"] and dataset.num_classes == 2
    assert dataset.coco.imgs[10]["file_name"] == "a.png"
    # xywh (1, 2, 10, 20) -> xyxy (1, 2, 11, 22)
    np.testing.assert_array_equal(dataset.load_annotations(1), [[1, 2, 11, 22, 0], [0, 0, 5, 5, 1]])
    assert dataset.load_annotations(0).shape == (0, 5)
    assert dataset.load_annotations(2).shape == (0, 5)
    assert dataset.aspect_ratio(0) == 20 / 50 and dataset.aspect_ratio(1) == 40 / 30
    assert dataset.image_path(1) == str(tmp_path / "images" / "val" / "a.png")
    item = dataset[1]
    assert item["image"].shape == (3, 30, 40) and item["annotations"].shape == (2, 5)


def test_coco_reads_images_from_root_set_name_folder(tmp_path):
    write_coco(tmp_path, "train2017", layout="flat")
    with pytest.warns(UserWarning, match="zero-area"):
        dataset = CocoDataset(str(tmp_path), "train2017")
    assert dataset.image_path(0) == str(tmp_path / "train2017" / "b.png")


def test_coco_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="instances_val.json: COCO annotation file not found"):
        CocoDataset(str(tmp_path), "val")


def minimal_coco(**changes):
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 20], "iscrowd": 0}],
        "categories": [{"id": 3, "name": "cat"}],
    }
    coco.update(changes)
    return coco


COCO_ERRORS = [
    ({"annotations": [], "categories": []}, "expected the sections ['images', 'annotations', 'categories']"),
    ([1, 2], "not a COCO instances file"),
    (minimal_coco(images=[{"id": 1, "file_name": "a.png"}]), "images[0] lacks ['width', 'height']"),
    (minimal_coco(annotations=[{"id": 1, "image_id": 1, "bbox": [1, 2, 3, 4]}]), "annotations[0] lacks ['category_id']"),
    (minimal_coco(categories=["cat"]), "categories[0] lacks ['id', 'name']"),
    (minimal_coco(images=[{"id": 1, "file_name": "a.png", "width": 4, "height": 3}] * 2),
     "images id(s) [1] listed more than once"),
    (minimal_coco(categories=[{"id": 3, "name": "cat"}, {"id": 3, "name": "dog"}]),
     "categories id(s) [3] listed more than once"),
    (minimal_coco(annotations=[{"id": 7, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3]}]),
     "annotation 7 has bbox [1, 2, 3]; expected [x, y, width, height]"),
    (minimal_coco(annotations=[{"id": 7, "image_id": 1, "category_id": 3, "bbox": [1, "2", 3, 4]}]),
     "annotation 7 has bbox"),
    (minimal_coco(annotations=[{"id": 7, "image_id": 9, "category_id": 3, "bbox": [1, 2, 3, 4]}]),
     "annotation 7 is of image_id 9, which is not in 'images'"),
    (minimal_coco(annotations=[{"id": 7, "image_id": 1, "category_id": 4, "bbox": [1, 2, 3, 4]}]),
     "annotation 7 has category_id 4, which is not in 'categories'"),
]


@pytest.mark.parametrize("content, message", COCO_ERRORS)
def test_coco_structure_errors_name_the_file_and_the_entry(tmp_path, content, message):
    save_image(tmp_path / "images" / "val" / "a.png", width=40, height=30)
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "instances_val.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError) as error:
        CocoDataset(str(tmp_path), "val")
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_coco_file_that_is_not_json_is_named(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_bytes(b"\xff\xfe{not json")
    with pytest.raises(ValueError, match="instances_val.json: not valid JSON"):
        CocoDataset(str(tmp_path), "val")


def test_a_directory_where_a_file_is_expected_is_named(tmp_path):
    (tmp_path / "classes.csv").mkdir()
    with pytest.raises(ValueError, match="classes.csv: file expected, found a directory"):
        read_class_list(str(tmp_path / "classes.csv"))
    (tmp_path / "a.png").mkdir()
    with pytest.raises(ValueError, match="a.png: image file expected, found a directory"):
        read_rgb_image(str(tmp_path / "a.png"))


def test_csv_that_is_not_utf8_names_the_line(tmp_path):
    classes = write(tmp_path / "classes.csv", CLASSES)
    annotations = tmp_path / "train.csv"
    annotations.write_bytes(b"a.png,1,2,3,4,cat\nb\xe9.png,1,2,3,4,cat\n")  # Latin-1 e-acute on line 2
    with pytest.raises(ValueError, match=r"train.csv, line 2: not UTF-8 text \(byte 0xe9\)"):
        CSVDataset(str(annotations), str(classes))


@settings(max_examples=300, deadline=None)
@given(content=st.one_of(
    st.binary(max_size=200),
    st.lists(st.lists(st.sampled_from(["a.png", "cat", "dog", "1", "2.5", "-3", "nan", "", '"', "x,y", "\r", "\x00",
                                        "\ufeff", "10", "1e3"]), max_size=8), max_size=6)
    .map(lambda rows: "\n".join(",".join(row) for row in rows).encode("utf-8")),
))
def test_fuzzed_csv_files_give_a_dataset_or_a_value_error_naming_file_and_line(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("fuzz")
    save_image(folder / "a.png", 40, 30)
    for name, other in (("train.csv", "classes.csv"), ("classes.csv", "train.csv")):
        path = folder / name
        path.write_bytes(content)
        write(folder / other, CLASSES if other == "classes.csv" else "a.png,1,2,10,20,cat\n")
        try:
            dataset = CSVDataset(str(folder / "train.csv"), str(folder / "classes.csv"))
        except ValueError as error:
            assert str(error).startswith(f"{path}, line ") or str(error).startswith(f"{path}: "), str(error)
            assert ", line " in str(error) or "image files not found" in str(error), str(error)
            continue
        assert all(annotations.shape[1] == 5 for annotations in dataset.annotations)


# ---------------------------------------------------------------------------------------------- image files


def test_images_of_every_mode_are_read_as_rgb(tmp_path):
    gray = np.array([[0, 128, 255]], dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "l.png")
    Image.fromarray(np.stack([gray, gray], axis=2), mode="LA").save(tmp_path / "la.png")
    rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 128], [70, 80, 90, 255]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    palette = Image.fromarray(np.array([[0, 1, 1]], dtype=np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.save(tmp_path / "p.png")
    sixteen = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)  # 8-bit 0, 100, 255
    Image.fromarray(sixteen).save(tmp_path / "i16.png")
    with Image.open(tmp_path / "i16.png") as stored:
        assert stored.mode == "I;16"

    expected = {
        "l.png": [[0, 128, 255]] * 3,
        "la.png": [[0, 128, 255]] * 3,
        "rgba.png": [[10, 40, 70], [20, 50, 80], [30, 60, 90]],
        "p.png": [[255, 0, 0], [0, 0, 0], [0, 255, 255]],
        "i16.png": [[0, 100, 255]] * 3,
    }
    for name, channels in expected.items():
        image = read_rgb_image(str(tmp_path / name))
        assert image.dtype == torch.uint8 and image.shape == (3, 1, 3), name
        torch.testing.assert_close(image[:, 0, :], torch.tensor(channels, dtype=torch.uint8), msg=name)


def broken_png(tmp_path):
    """A PNG whose second IDAT chunk has a garbled chunk type: Pillow raises SyntaxError while decoding."""
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    data = bytearray((tmp_path / "noise.png").read_bytes())
    second_idat = data.find(b"IDAT", data.find(b"IDAT") + 4)
    data[second_idat : second_idat + 4] = b"\x00\x01\x02\x03"
    return bytes(data)


def truncated(tmp_path, suffix):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / f"full{suffix}")
    data = (tmp_path / f"full{suffix}").read_bytes()
    return data[: len(data) // 2]


BAD_FILES = {
    "zero.png": lambda tmp_path: b"",
    "text.jpg": lambda tmp_path: b"this is not an image\n",
    "truncated.png": lambda tmp_path: truncated(tmp_path, ".png"),
    "truncated.jpg": lambda tmp_path: truncated(tmp_path, ".jpg"),
    "broken_chunk.png": broken_png,
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_undecodable_images_raise_value_error_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name](tmp_path))
    with pytest.raises(ValueError, match="cannot decode image") as error:
        read_rgb_image(str(path))
    assert str(path) in str(error.value)


def test_broken_image_is_named_when_the_item_is_loaded(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    classes = write(tmp_path / "classes.csv", CLASSES)
    annotations = write(tmp_path / "train.csv", "a.png,1,2,3,4,cat\n")
    dataset = CSVDataset(str(annotations), str(classes))
    with pytest.raises(ValueError, match=f"{tmp_path / 'a.png'}: cannot decode image"):
        dataset[0]
    with pytest.raises(ValueError, match=f"{tmp_path / 'a.png'}: cannot decode image"):
        dataset.aspect_ratio(0)


def test_missing_image_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / 'gone.png'}: image file not found"):
        read_rgb_image(str(tmp_path / "gone.png"))


@pytest.mark.parametrize("side", [12, 20])  # 144 pixels: Pillow would only warn; 400 > 2 * 100: Pillow's error
def test_decompression_bombs_are_refused(tmp_path, monkeypatch, side):
    path = save_image(tmp_path / "big.png", side, side)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match="decompression bomb") as error:
        read_rgb_image(str(path))
    assert str(path) in str(error.value)


# ------------------------------------------------------------------------------------------------ transforms


def test_resize_scales_shorter_side_and_boxes_by_the_reported_factor():
    image = torch.rand(3, 30, 40)
    boxes = torch.tensor([[1.0, 2.0, 10.0, 20.0]])
    resized, resized_boxes, scale = Resize(60, 1000)(image, boxes)
    assert scale == 2.0  # shorter side 30 -> 60
    assert resized.shape == (3, 60, 80)
    torch.testing.assert_close(resized_boxes, boxes * 2)


def test_resize_respects_max_size():
    image = torch.rand(3, 10, 40)
    # shorter side 10 -> 60 would make the longer side 240 > 100, so the longer side becomes 100: scale 2.5
    resized, boxes, scale = Resize(60, 100)(image, torch.tensor([[0.0, 0.0, 40.0, 10.0]]))
    assert scale == 2.5
    assert resized.shape == (3, 25, 100)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 100.0, 25.0]]))


def test_resize_keeps_a_constant_image_constant_and_jitter_draws_every_size():
    image = torch.full((3, 37, 53), 0.3)
    resized, _, _ = Resize(17, 1000)(image, torch.zeros(0, 4))  # antialiased downsampling
    torch.testing.assert_close(resized, torch.full((3, 17, 24), 0.3))  # 53 * 17 / 37 = 24.4
    torch.manual_seed(0)
    jitter = Resize((50, 53), 1000)
    shorter_sides = {jitter(torch.rand(3, 30, 40), torch.zeros(0, 4))[0].shape[1] for _ in range(60)}
    assert shorter_sides == {50, 51, 52, 53}


@pytest.mark.parametrize("min_size, max_size", [(0, 10), (20, 10), ((60, 50), 100), ((40, 120), 100)])
def test_resize_rejects_bad_sizes(min_size, max_size):
    with pytest.raises(ValueError, match="min_size"):
        Resize(min_size, max_size)


def test_flip_by_hand_and_twice_is_identity():
    image = torch.rand(3, 30, 40)
    boxes = torch.tensor([[1.0, 2.0, 10.0, 20.0], [0.0, 0.0, 40.0, 30.0]])
    flip = RandomHorizontalFlip(p=1.0)
    flipped, flipped_boxes = flip(image, boxes)
    # x1' = W - x2 = 40 - 10, x2' = W - x1 = 40 - 1
    torch.testing.assert_close(flipped_boxes, torch.tensor([[30.0, 2.0, 39.0, 20.0], [0.0, 0.0, 40.0, 30.0]]))
    torch.testing.assert_close(flipped[:, :, 0], image[:, :, 39])
    again, again_boxes = flip(flipped, flipped_boxes)
    torch.testing.assert_close(again, image)
    torch.testing.assert_close(again_boxes, boxes)
    unchanged, unchanged_boxes = RandomHorizontalFlip(p=0.0)(image, boxes)
    assert unchanged is image and unchanged_boxes is boxes


def test_normalize_uses_imagenet_statistics():
    normalized, _ = Normalize()(torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, 2, 2), torch.zeros(0, 4))
    torch.testing.assert_close(normalized, torch.zeros(3, 2, 2))


def test_build_transform_scale_reaches_the_item(tmp_path):
    save_image(tmp_path / "a.png", width=40, height=30)
    classes = write(tmp_path / "classes.csv", CLASSES)
    annotations = write(tmp_path / "train.csv", "a.png,1,2,10,20,dog\n")
    dataset = CSVDataset(str(annotations), str(classes), transform=build_transform(False, 60, 1000))
    item = dataset[0]
    assert item["scale"] == 2.0 and item["image"].shape == (3, 60, 80) and item["original_size"] == (30, 40)
    torch.testing.assert_close(item["annotations"], torch.tensor([[2.0, 4.0, 20.0, 40.0, 1.0]]))
    train = build_transform(True, 60, 1000, jitter=(45, 75))
    assert train.resize.size_range == (45, 75) and train.flip.p == 0.5
    assert build_transform(False, 60, 1000, jitter=(45, 75)).flip is None


# -------------------------------------------------------------------------------------------------- batching


def item(height, width, boxes, index, scale=1.0):
    return {"image": torch.rand(3, height, width), "annotations": torch.tensor(boxes, dtype=torch.float32).view(-1, 5),
            "scale": scale, "index": index, "original_size": (height * 2, width * 2)}


def test_collate_pads_images_to_multiples_of_32_and_annotations_with_minus_one():
    first = item(50, 70, [[1, 2, 3, 4, 0], [5, 6, 7, 8, 1]], index=7, scale=0.5)
    second = item(64, 33, [], index=3, scale=2.0)
    batch = collate([first, second])
    assert batch["images"].shape == (2, 3, 64, 96)  # max 64 x 70, 70 rounded up to 96
    torch.testing.assert_close(batch["images"][0, :, :50, :70], first["image"])
    torch.testing.assert_close(batch["images"][1, :, :, :33], second["image"])
    assert batch["images"][0, :, 50:].abs().sum() == 0 and batch["images"][1, :, :, 33:].abs().sum() == 0
    assert batch["annotations"].shape == (2, 2, 5)
    torch.testing.assert_close(batch["annotations"][0], first["annotations"])
    torch.testing.assert_close(batch["annotations"][1], torch.full((2, 5), -1.0))
    torch.testing.assert_close(batch["scales"], torch.tensor([0.5, 2.0]))
    assert batch["indices"] == [7, 3] and batch["original_sizes"] == [(100, 140), (128, 66)]


def test_collate_of_images_without_boxes_and_another_divisor():
    batch = collate([item(10, 12, [], 0), item(7, 20, [], 1)], size_divisible=8)
    assert batch["images"].shape == (2, 3, 16, 24)
    assert batch["annotations"].shape == (2, 0, 5) and batch["annotations"].dtype == torch.float32
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


RATIOS = [1.5, 0.5, 1.0, 0.75, 2.0, 0.6, 1.33, 1.33, 0.9, 1.2, 0.8, 1.1, 0.5, 1.7, 0.4, 1.0, 3.0, 0.7, 1.25]


def test_sampler_groups_orientations_and_yields_each_index_once_per_epoch():
    sampler = AspectRatioBatchSampler(RATIOS, batch_size=4, seed=1)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 5  # 11 landscape -> 4 + 4 + 3, 8 portrait -> 4 + 4
        assert sorted(index for batch in batches for index in batch) == list(range(len(RATIOS)))
        for batch in batches:
            assert len({RATIOS[index] >= 1 for index in batch}) == 1
            assert 1 <= len(batch) <= 4


def test_sampler_order_changes_with_the_epoch_and_set_epoch_is_deterministic():
    sampler = AspectRatioBatchSampler(RATIOS, batch_size=4, seed=1)
    epoch_0 = list(sampler)
    sampler.set_epoch(1)
    epoch_1 = list(sampler)
    assert epoch_0 != epoch_1
    assert list(sampler) == epoch_1
    sampler.set_epoch(0)
    assert list(sampler) == epoch_0
    other_seed = AspectRatioBatchSampler(RATIOS, batch_size=4, seed=2)
    assert list(other_seed) != epoch_0


def test_sampler_without_shuffle_and_with_drop_last():
    batches = list(AspectRatioBatchSampler(RATIOS[:6], batch_size=2, shuffle=False))
    # landscape 0, 2, 4; portrait 1, 3, 5: buckets are emitted as they fill, then the leftovers (portrait first)
    assert batches == [[0, 2], [1, 3], [5], [4]]
    dropped = AspectRatioBatchSampler(RATIOS[:6], batch_size=2, shuffle=False, drop_last=True)
    assert list(dropped) == [[0, 2], [1, 3]] and len(dropped) == 2


def test_sampler_shards_are_disjoint_and_cover_every_index():
    ranks = [AspectRatioBatchSampler(RATIOS, batch_size=3, num_replicas=2, rank=rank, seed=5) for rank in (0, 1)]
    # 11 landscape -> 4 batches, 8 portrait -> 3 batches: 7 batches, one repeated so each rank gets 4
    assert len(ranks[0]) == len(ranks[1]) == 4
    shards = [list(sampler) for sampler in ranks]
    assert [len(shard) for shard in shards] == [4, 4]
    indices = [[index for batch in shard for index in batch] for shard in shards]
    assert sorted(indices[0] + indices[1][:-len(shards[1][-1])]) == list(range(len(RATIOS)))  # minus the repeat
    assert shards[1][-1] == shards[0][0]  # the padding repeats the first batch
    assert not set(indices[0]) & set(index for batch in shards[1][:-1] for index in batch)


@settings(max_examples=60, deadline=None)
@given(
    num_images=st.integers(1, 40),
    batch_size=st.integers(1, 6),
    num_replicas=st.integers(1, 4),
    drop_last=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_sampler_length_is_exact_on_every_rank(num_images, batch_size, num_replicas, drop_last, seed):
    ratios = np.random.default_rng(seed).uniform(0.3, 3.0, num_images).tolist()
    samplers = [
        AspectRatioBatchSampler(ratios, batch_size, drop_last=drop_last, num_replicas=num_replicas, rank=rank)
        for rank in range(num_replicas)
    ]
    shards = [list(sampler) for sampler in samplers]
    lengths = [len(sampler) for sampler in samplers]
    assert [len(shard) for shard in shards] == lengths == [lengths[0]] * num_replicas
    seen = [index for shard in shards for batch in shard for index in batch]
    if not drop_last:
        assert set(seen) == set(range(num_images))
    else:
        assert len(seen) == len(set(seen))


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        AspectRatioBatchSampler(RATIOS, batch_size=2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="at least one"):
        AspectRatioBatchSampler([], batch_size=2)


# ---------------------------------------------------------------------------------------------- shapes data


def test_shapes_dataset_is_deterministic_and_reads_the_same_through_csv_and_coco(tmp_path):
    first = make_shapes_dataset(str(tmp_path / "a"), "train", num_images=4, image_size=96, seed=3)
    second = make_shapes_dataset(str(tmp_path / "b"), "train", num_images=4, image_size=96, seed=3)
    other_seed = make_shapes_dataset(str(tmp_path / "c"), "train", num_images=4, image_size=96, seed=4)
    text = (tmp_path / "a" / "train.csv").read_text()
    assert text == (tmp_path / "b" / "train.csv").read_text() != (tmp_path / "c" / "train.csv").read_text()
    assert first == {"csv": str(tmp_path / "a" / "train.csv"), "classes": str(tmp_path / "a" / "classes.csv"),
                     "coco_root": str(tmp_path / "a"), "set_name": "train"}

    csv_dataset = CSVDataset(first["csv"], first["classes"])
    coco_dataset = CocoDataset(first["coco_root"], first["set_name"])
    other = CSVDataset(second["csv"], second["classes"])
    assert csv_dataset.class_names == coco_dataset.class_names == ["circle", "rectangle", "triangle", "ellipse", "star"]
    assert len(csv_dataset) == len(coco_dataset) == 4
    for i in range(4):
        assert csv_dataset.image_path(i) == coco_dataset.image_path(i)
        boxes = csv_dataset.load_annotations(i)
        np.testing.assert_array_equal(boxes, coco_dataset.load_annotations(i))
        assert 1 <= len(boxes) <= 4
        assert (boxes[:, :4] >= 0).all() and (boxes[:, :4] <= 96).all() and set(boxes[:, 4]) <= set(range(5))
        assert (boxes[:, 2] - boxes[:, 0] >= 5).all() and (boxes[:, 3] - boxes[:, 1] >= 5).all()
        torch.testing.assert_close(read_rgb_image(csv_dataset.image_path(i)), read_rgb_image(other.image_path(i)))
    assert not torch.equal(read_rgb_image(csv_dataset.image_path(0)), read_rgb_image(other_seed["coco_root"] +
                                                                                    "/images/train/00000.png"))


def test_shapes_dataset_is_reused_and_regenerated_when_parameters_change_or_it_was_interrupted(tmp_path, monkeypatch):
    root = str(tmp_path)
    make_shapes_dataset(root, "val", num_images=2, image_size=64)
    render = dataloader._render_shapes_image
    calls = []
    monkeypatch.setattr(dataloader, "_render_shapes_image", lambda *args: calls.append(1) or render(*args))

    make_shapes_dataset(root, "val", num_images=2, image_size=64)
    assert calls == []  # same parameters: reused
    make_shapes_dataset(root, "val", num_images=3, image_size=64)
    assert len(calls) == 3 and len(CSVDataset(str(tmp_path / "val.csv"), str(tmp_path / "classes.csv"))) == 3
    (tmp_path / "val.done.json").unlink()  # as if interrupted before the stamp was written
    make_shapes_dataset(root, "val", num_images=3, image_size=64)
    assert len(calls) == 6
    assert json.loads((tmp_path / "val.done.json").read_text())["num_images"] == 3


def test_shapes_images_without_shapes_are_written_as_negatives(tmp_path, monkeypatch):
    monkeypatch.setattr(dataloader, "_place_shape", lambda *args: None)  # as if every placement failed
    paths = make_shapes_dataset(str(tmp_path), "val", num_images=2, image_size=64)
    assert (tmp_path / "val.csv").read_text() == "images/val/00000.png,,,,,\nimages/val/00001.png,,,,,\n"
    for dataset in (CSVDataset(paths["csv"], paths["classes"]), CocoDataset(paths["coco_root"], "val")):
        assert len(dataset) == 2 and dataset.load_annotations(1).shape == (0, 5)
