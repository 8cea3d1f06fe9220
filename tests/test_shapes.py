import json

import numpy as np
import torch

from retinanet.data import shapes
from retinanet.data.coco import CocoDataset
from retinanet.data.shapes import make_shapes_dataset
from retinanet.dataloader import CSVDataset, read_rgb_image


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
        assert csv_dataset.image_paths[i] == coco_dataset.image_paths[i]
        boxes = csv_dataset.load_annotations(i)
        np.testing.assert_array_equal(boxes, coco_dataset.load_annotations(i))
        assert 1 <= len(boxes) <= 4
        assert (boxes[:, :4] >= 0).all() and (boxes[:, :4] <= 96).all() and set(boxes[:, 4]) <= set(range(5))
        assert (boxes[:, 2] - boxes[:, 0] >= 5).all() and (boxes[:, 3] - boxes[:, 1] >= 5).all()
        torch.testing.assert_close(read_rgb_image(csv_dataset.image_paths[i]), read_rgb_image(other.image_paths[i]))
    assert not torch.equal(read_rgb_image(csv_dataset.image_paths[0]), read_rgb_image(other_seed["coco_root"] +
                                                                                    "/images/train/00000.png"))


def test_shapes_dataset_is_reused_and_regenerated_when_parameters_change_or_it_was_interrupted(tmp_path, monkeypatch):
    root = str(tmp_path)
    make_shapes_dataset(root, "val", num_images=2, image_size=64)
    render = shapes._render_shapes_image
    calls = []
    monkeypatch.setattr(shapes, "_render_shapes_image", lambda *args: calls.append(1) or render(*args))

    make_shapes_dataset(root, "val", num_images=2, image_size=64)
    assert calls == []  # same parameters: reused
    make_shapes_dataset(root, "val", num_images=3, image_size=64)
    assert len(calls) == 3 and len(CSVDataset(str(tmp_path / "val.csv"), str(tmp_path / "classes.csv"))) == 3
    (tmp_path / "val.done.json").unlink()  # as if interrupted before the stamp was written
    make_shapes_dataset(root, "val", num_images=3, image_size=64)
    assert len(calls) == 6
    assert json.loads((tmp_path / "val.done.json").read_text())["num_images"] == 3


def test_shapes_images_without_shapes_are_written_as_negatives(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes, "_place_shape", lambda *args: None)  # as if every placement failed
    paths = make_shapes_dataset(str(tmp_path), "val", num_images=2, image_size=64)
    assert (tmp_path / "val.csv").read_text() == "images/val/00000.png,,,,,\nimages/val/00001.png,,,,,\n"
    for dataset in (CSVDataset(paths["csv"], paths["classes"]), CocoDataset(paths["coco_root"], "val")):
        assert len(dataset) == 2 and dataset.load_annotations(1).shape == (0, 5)
