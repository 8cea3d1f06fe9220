"""Tests of predict.py: which images the inputs name, the CSV and JSON files
against the model's own detections, images that cannot be read, and (slow) tiled against whole-image prediction with
a RetinaNet trained by train.py on small objects."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from conftest import save_image
from small_objects import save_scene, scatter_objects, write_training_set
from test_tiling import truncated_png
from torchvision.ops import box_iou

import predict
import train

from retinanet.checkpoint import load_model, read_checkpoint
from retinanet.dataloader import DetectionDataset, build_transform, find_images, read_csv_image_paths
from retinanet.evaluation import predict_dataset
from retinanet.settings import INFERENCE_SETTINGS, typed_settings

NUM_VAL_IMAGES = 4  # the shapes validation images of trained_shapes_run


def inference_flags(run) -> list[str]:
    return ["--model", run.checkpoint, "--device", "cpu", "--batch_size", "2", "--workers", "0"]


def read_rows(path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as file:
        return list(csv.reader(file))


# ----------------------------------------------------------------------------------------------------- inputs


def test_inputs_mix_files_folders_searched_recursively_and_csv_images_each_once(tmp_path):
    for name in ("photos/b.png", "photos/a.jpg", "photos/trip/c.png", "other/d.png", "e.bmp"):
        save_image(tmp_path / name, 8, 8)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    # Relative to the CSV's folder, with classes of any list; photos/a.jpg is also in the folder
    (tmp_path / "list.csv").write_text("other/d.png,1,1,5,5,zebra\nphotos/a.jpg,,,,,\nother/d.png,2,2,6,6,yak\n")
    inputs = [str(tmp_path / "photos"), str(tmp_path / "list.csv"), str(tmp_path / "e.bmp"), str(tmp_path / "gone.png")]
    assert predict.collect_images(inputs) == [str(tmp_path / name) for name in
                                      ("photos/a.jpg", "photos/b.png", "photos/trip/c.png", "other/d.png", "e.bmp",
                                       "gone.png")]  # a missing image is found missing when it is read
    assert find_images(str(tmp_path / "photos")) == [str(tmp_path / "photos" / name) for name in ("a.jpg", "b.png")]


def test_csv_inputs_need_six_columns_and_a_path(tmp_path):
    (tmp_path / "bad.csv").write_text("a.png,,,,,\nb.png,1,2,3\n")
    with pytest.raises(ValueError, match="bad.csv, line 2: 4 columns, expected 6"):
        read_csv_image_paths(str(tmp_path / "bad.csv"))


# ------------------------------------------------------------------------------------------------ the script


def test_csv_holds_the_models_detections_in_original_pixels_and_json_the_same(trained_shapes_run, tmp_path):
    images = os.path.join(trained_shapes_run.data_dir, "images", "val")
    flags = [images, "--score_threshold", "0.001", *inference_flags(trained_shapes_run)]  # a 2-iteration model's scores
    assert predict.main([*flags, "--output", str(tmp_path / "found.csv")]) == 0
    assert predict.main([*flags, "--output", str(tmp_path / "found.json"), "--draw", str(tmp_path / "drawn")]) == 0
    model, class_names = load_model(trained_shapes_run.checkpoint, "cpu", score_threshold=0.001)
    paths = find_images(images)
    transform = build_transform(False, model.settings.min_size, model.settings.max_size)
    dataset = DetectionDataset(paths, [np.zeros((0, 5), np.float32)] * len(paths), class_names, transform)
    expected = [(path, *box, class_names[label], score) for path, prediction in
                zip(paths, predict_dataset(model, dataset, batch_size=2))
                for box, label, score in zip(prediction["boxes"].tolist(), prediction["labels"], prediction["scores"])]
    rows = read_rows(tmp_path / "found.csv")
    assert len(rows) == len(expected) > NUM_VAL_IMAGES
    for row, (path, x1, y1, x2, y2, class_name, score) in zip(rows, expected):
        assert row[0] == path and row[5] == class_name
        assert [float(value) for value in row[1:5]] == pytest.approx([x1, y1, x2, y2], abs=0.005)
        assert float(row[6]) == pytest.approx(score, abs=5e-5)
    results = json.loads((tmp_path / "found.json").read_text())
    assert [(result["file_name"], result["category_name"]) for result in results] == [(row[0], row[5]) for row in rows]
    x1, y1, x2, y2 = (float(value) for value in rows[0][1:5])
    assert results[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.011) and set(results[0]) == {
        "file_name", "bbox", "category_name", "score"}
    assert sorted(os.listdir(tmp_path / "drawn")) == sorted(os.listdir(images))


def test_every_image_of_a_folder_and_a_csv_is_in_the_output_once(trained_shapes_run, tmp_path, capsys):
    data = trained_shapes_run.data_dir
    save_image(tmp_path / "photos" / "deep" / "x.png", 200, 120)
    save_image(tmp_path / "photos" / "y.jpg", 64, 300)
    argv = [str(tmp_path / "photos"), os.path.join(data, "val.csv"), "--output", str(tmp_path / "found.csv"),
            *inference_flags(trained_shapes_run)]
    assert predict.main(argv) == 0
    rows = read_rows(tmp_path / "found.csv")
    val_images = [os.path.join(data, "images", "val", f"{index:05d}.png") for index in range(NUM_VAL_IMAGES)]
    in_order = [str(tmp_path / "photos" / "deep" / "x.png"), str(tmp_path / "photos" / "y.jpg"), *val_images]
    assert list(dict.fromkeys(row[0] for row in rows)) == in_order
    for path in in_order:  # either detections, or one row without any
        own = [row for row in rows if row[0] == path]
        assert all(row[1] and 0.05 <= float(row[6]) <= 1 for row in own) or own == [[path, "", "", "", "", "", ""]]
    assert f"in {len(in_order)} images to {tmp_path / 'found.csv'}" in capsys.readouterr().out


def test_unreadable_images_are_named_skipped_and_exit_with_status_1(trained_shapes_run, tmp_path, capsys):
    good = [save_image(tmp_path / "in" / name, 100, 80) for name in ("a.png", "c.png")]
    (tmp_path / "in" / "b.png").write_text("not an image")
    truncated = truncated_png(tmp_path / "in" / "d.png")
    argv = [str(tmp_path / "in"), str(tmp_path / "gone.jpg"), "--output", str(tmp_path / "found.csv"),
            "--tile_size", "64", *inference_flags(trained_shapes_run)]
    assert predict.main(argv) == 1
    error = capsys.readouterr().err
    assert "skipped 3 image(s) that could not be read" in error and "Traceback" not in error
    assert f"{tmp_path / 'in' / 'b.png'}: cannot decode image" in error
    assert f"{truncated}: cannot decode image: image file is truncated" in error
    assert f"{tmp_path / 'gone.jpg'}: image file not found" in error
    assert sorted({row[0] for row in read_rows(tmp_path / "found.csv")}) == [str(path) for path in good]
    assert sorted(os.listdir(tmp_path)) == ["found.csv", "in"]  # and no temporary file


def test_image_sizes_given_for_inference_are_the_models_settings_and_the_datasets_resize(trained_shapes_run):
    paths = find_images(os.path.join(trained_shapes_run.data_dir, "images", "val"))
    # as the scripts load a model: the flags typed (not None) replace the checkpoint's settings, the others stay
    model = load_model(trained_shapes_run.checkpoint, "cpu",
                       **typed_settings(dict(min_size=48, max_size=72, score_threshold=None),
                                                       INFERENCE_SETTINGS)).model
    assert (model.settings.min_size, model.settings.max_size) == (48, 72)
    trained = read_checkpoint(trained_shapes_run.checkpoint)["model_settings"]
    assert (trained["min_size"], trained["max_size"]) == (96, 96)
    assert model.settings.score_threshold == trained["score_threshold"] == 0.05
    transform = build_transform(False, model.settings.min_size, model.settings.max_size)
    dataset = DetectionDataset(paths, [np.zeros((0, 5), np.float32)] * len(paths), [], transform)
    assert (dataset.transform.resize.min_size, dataset.transform.resize.max_size) == (48, 72)
    item = dataset[0]
    assert item["original_size"] == (160, 160) and item["image"].shape == (3, 48, 48) and item["scale"] == pytest.approx(0.3)


def test_an_output_of_another_format_stops_before_the_model_is_read(tmp_path, capsys):
    save_image(tmp_path / "a.png", 8, 8)
    assert predict.main([str(tmp_path / "a.png"), "--output", "found.txt", "--model", "missing.pt"]) == 2
    assert capsys.readouterr().err.startswith("predict.py: error: found.txt: the output file must end in .csv")


@pytest.mark.parametrize("flag", [["--tile_overlap", "0.5"], ["--draw_threshold", "0.3"], ["--score_threshold", "5"],
                                  ["--draw", "out", "--draw_threshold", "-1"]])
def test_flags_of_tiling_and_drawing_need_their_option_and_scores_lie_in_0_1(flag):
    with pytest.raises(SystemExit) as exit_info:
        predict.parse_args(["a.png", "--output", "x.csv", "--model", "m.pt", *flag])
    assert exit_info.value.code == 2


# ----------------------------------------------------------------------------------- tiled against whole


def recall_and_repeats(objects: list[tuple], csv_path, score_threshold: float = 0.5) -> tuple[float, int]:
    """The fraction of objects that a detection of score >= score_threshold overlaps by IoU >= 0.5, and how many
    objects more than one does."""
    rows = [row for row in read_rows(csv_path) if row[1] and float(row[6]) >= score_threshold]
    found = torch.tensor([[float(value) for value in row[1:5]] for row in rows]).reshape(-1, 4)
    hits = (box_iou(torch.tensor([box[:4] for box in objects], dtype=torch.float32), found) >= 0.5).sum(dim=1)
    return float((hits > 0).float().mean()), int((hits > 1).sum())


@pytest.mark.slow
def test_tiles_find_small_objects_that_the_whole_image_loses(tmp_path, capsys):
    """A RetinaNet-18 trained with train.py for 100 iterations on 64-pixel views of 256-pixel scenes (objects of 20-30
    pixels, one class), then run on a 2400 x 1800 scene of 40 such objects of 80-120 pixels, whole (resized to
    64 x 48, as the model was trained), in 256-pixel tiles (each seen at the scale of training, 1/4), and whole at
    that scale. Measured with --seed 0 to 3 (2 cores of an Intel Xeon, bf16): recall tiled 0.70, 0.975, 0.975, 0.825
    (no object found twice), whole 0 each time, whole at the tiles' scale 0.60 to 1.0; the test runs seed 0."""
    train_csv, classes = write_training_set(str(tmp_path / "train"), 120, class_names=("shape",))
    assert train.main(["--dataset", "csv", "--csv_train", train_csv, "--classes", classes, "--depth", "18",
                       "--no_pretrained", "--optimizer", "adamw", "--box_coding", "yhenon", "--min_size", "64",
                       "--max_size", "64", "--batch_size", "8", "--iters", "100", "--warmup_iters", "20",
                       "--eval_every", "0", "--workers", "0", "--output_dir", str(tmp_path / "out")]) == 0
    objects = scatter_objects(np.random.default_rng(7), 1800, 2400, 40)
    image = save_scene(str(tmp_path / "large.png"), 1800, 2400, objects, seed=7)
    flags = [image, "--model", str(tmp_path / "out" / "last.pt"), "--workers", "0"]
    tiled_flags = ["--tile_size", "256", "--tile_overlap", "0.5"]
    at_tile_scale = ["--min_size", "450", "--max_size", "600"]  # the whole image at 1/4, as the tiles
    assert predict.main([*flags, "--output", str(tmp_path / "tiled.csv"), *tiled_flags]) == 0
    assert predict.main([*flags, "--output", str(tmp_path / "whole.csv")]) == 0
    assert predict.main([*flags, "--output", str(tmp_path / "large.csv"), *at_tile_scale]) == 0
    (tiled, tiled_repeats), (whole, _), (large, _) = (recall_and_repeats(objects, tmp_path / name)
                                                      for name in ("tiled.csv", "whole.csv", "large.csv"))
    with capsys.disabled():
        print(f"\nrecall at score >= 0.5: tiled {tiled:.3f}, whole {whole:.3f}, whole at the tiles' scale {large:.3f}")
    assert tiled >= 0.6 and whole <= 0.1 and tiled_repeats == 0
