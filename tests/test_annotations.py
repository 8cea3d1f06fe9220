import json

import numpy as np
import pytest
import torch
from conftest import CLASSES, save_image, write
from hypothesis import given, settings, strategies as st

from retinanet.data.coco import CocoDataset
from retinanet.dataloader import CSVDataset, read_class_list, read_rgb_image

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
    assert dataset.image_paths[0] == str(tmp_path / "my dir" / "a, b.png")
    expected = np.array([[1.5, 2, 10.25, 20, 1], [0, 0, 5, 5, 0]], dtype=np.float32)
    np.testing.assert_array_equal(dataset.load_annotations(0), expected)
    assert dataset.load_annotations(1).shape == (0, 5)
    assert dataset.image_sizes[0] == (30, 40)
    assert dataset.image_sizes[1] == (50, 20)


def test_csv_item_is_uint8_rgb_with_annotations(tmp_path):
    save_image(tmp_path / "a.png", width=40, height=30, color=(255, 0, 51))
    save_image(tmp_path / "b.png", width=20, height=50)
    classes = write(tmp_path / "classes.csv", CLASSES)
    annotations = write(tmp_path / "train.csv", f"a.png,1,2,10,20,dog\n{tmp_path / 'b.png'},,,,,\n")  # absolute
    dataset = CSVDataset(str(annotations), str(classes))

    item = dataset[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 30, 40)
    assert item["image"][:, 7, 9].tolist() == [255, 0, 51]  # as in the file; the model normalises
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


def test_boxes_are_clipped_to_the_image_and_vanished_ones_dropped_with_a_message(tmp_path, capsys):
    image = save_image(tmp_path / "a.png", width=40, height=30)
    classes = write(tmp_path / "classes.csv", CLASSES)
    annotations = write(tmp_path / "train.csv", "a.png,30,5,60,20,cat\na.png,45,5,60,20,dog\n")
    dataset = CSVDataset(str(annotations), str(classes))
    assert f"1 image(s) have boxes reaching past the image, such as {image}: they are clipped" in capsys.readouterr().out
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


def test_coco_maps_category_ids_skips_crowd_and_zero_area_keeps_negatives(tmp_path, capsys):
    write_coco(tmp_path, "val")
    dataset = CocoDataset(str(tmp_path), "val")
    assert "dropped 1 zero-area box(es), annotation ids [4]" in capsys.readouterr().out

    assert dataset.image_ids == [5, 10, 12]
    assert dataset.coco_id_to_label == {3: 0, 7: 1}
    assert dataset.label_to_coco_id == {0: 3, 1: 7}
    assert dataset.class_names == ["cat", "dog"] and dataset.num_classes == 2
    assert dataset.coco.imgs[10]["file_name"] == "a.png"
    # xywh (1, 2, 10, 20) -> xyxy (1, 2, 11, 22)
    np.testing.assert_array_equal(dataset.load_annotations(1), [[1, 2, 11, 22, 0], [0, 0, 5, 5, 1]])
    assert dataset.load_annotations(0).shape == (0, 5)
    assert dataset.load_annotations(2).shape == (0, 5)
    assert dataset.image_sizes[0] == (50, 20) and dataset.image_sizes[1] == (30, 40)
    assert dataset.image_paths[1] == str(tmp_path / "images" / "val" / "a.png")
    item = dataset[1]
    assert item["image"].shape == (3, 30, 40) and item["annotations"].shape == (2, 5)


def test_coco_reads_images_from_root_set_name_folder(tmp_path, capsys):
    write_coco(tmp_path, "train2017", layout="flat")
    dataset = CocoDataset(str(tmp_path), "train2017")
    assert "zero-area" in capsys.readouterr().out
    assert dataset.image_paths[0] == str(tmp_path / "train2017" / "b.png")


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
