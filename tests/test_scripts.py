"""End-to-end runs of the scripts that read a checkpoint (csv_eval.py, coco_eval.py, visualize.py) through their
main(argv), on the CPU, with the model of a 2-iteration training run on a tiny shapes set (conftest.py). Such a
model detects little: these tests check exit codes, files and formats, not accuracy."""

import csv
import json
import os

from PIL import Image

import coco_eval
import csv_eval
import visualize

from retinanet.extras.drawing import CAPTION_HEIGHT

SHAPES_IMAGE_SIZE = 160  # make_shapes_dataset's default, used by train.py
NUM_VAL_IMAGES = 4


def inference_flags(run) -> list[str]:
    return ["--model", run.checkpoint, "--device", "cpu", "--batch_size", "2", "--workers", "0"]


def test_csv_eval_prints_the_map_and_saves_a_curve_per_annotated_class(trained_shapes_run, tmp_path, capsys):
    data = trained_shapes_run.data_dir
    argv = ["--csv_val", os.path.join(data, "val.csv"), "--classes", os.path.join(data, "classes.csv"),
            "--pr_curves", str(tmp_path / "curves"), *inference_flags(trained_shapes_run)]
    assert csv_eval.main(argv) == 0
    output = capsys.readouterr().out
    assert "mAP: " in output and "precision-recall curves" in output
    with open(os.path.join(data, "val.csv"), encoding="utf-8") as file:
        annotated = {row[5] for row in csv.reader(file) if row[5]}
    curves = sorted(os.listdir(tmp_path / "curves"))
    assert len(curves) == len(annotated) and all(name.endswith(".png") for name in curves)
    assert {name[4:-4] for name in curves} == annotated  # 000_circle.png -> circle


def test_coco_eval_writes_the_results_file(trained_shapes_run, tmp_path, capsys):
    argv = ["--coco_path", trained_shapes_run.data_dir, "--val_set", "val", "--output_dir", str(tmp_path),
            *inference_flags(trained_shapes_run)]
    assert coco_eval.main(argv) == 0
    assert "AP@[.5:.95]" in capsys.readouterr().out
    results = json.loads((tmp_path / "val_bbox_results.json").read_text())
    assert isinstance(results, list)
    for result in results:  # COCO's results format; ids as in instances_val.json (images 1..4, categories 1..5)
        assert set(result) == {"image_id", "category_id", "bbox", "score"}
        assert 1 <= result["image_id"] <= NUM_VAL_IMAGES and 1 <= result["category_id"] <= 5
        assert len(result["bbox"]) == 4 and 0.0 <= result["score"] <= 1.0


def test_visualize_draws_a_folder_of_images_at_their_size(trained_shapes_run, tmp_path, capsys):
    images = os.path.join(trained_shapes_run.data_dir, "images", "val")
    argv = ["--images", images, "--output_dir", str(tmp_path / "drawn"), "--draw_threshold", "0.05",
            *inference_flags(trained_shapes_run)]
    assert visualize.main(argv) == 0
    assert str(tmp_path / "drawn") in capsys.readouterr().out.splitlines()[-1]  # ends by saying where
    assert sorted(os.listdir(tmp_path / "drawn")) == sorted(os.listdir(images))
    for name in os.listdir(tmp_path / "drawn"):
        with Image.open(tmp_path / "drawn" / name) as image:
            assert (image.format, image.size) == ("PNG", (SHAPES_IMAGE_SIZE, SHAPES_IMAGE_SIZE))


def test_visualize_shows_ground_truth_next_to_predictions(trained_shapes_run, tmp_path):
    data = trained_shapes_run.data_dir
    datasets = {
        "csv": ["--csv_val", os.path.join(data, "val.csv"), "--classes", os.path.join(data, "classes.csv")],
        "coco": ["--coco_path", data, "--val_set", "val"],
    }
    for name, flags in datasets.items():
        output = tmp_path / name
        argv = ["--dataset", name, *flags, "--limit", "3", "--output_dir", str(output),
                *inference_flags(trained_shapes_run)]
        assert visualize.main(argv) == 0
        assert sorted(os.listdir(output)) == ["00000.png", "00001.png", "00002.png"]
        for drawn in os.listdir(output):
            with Image.open(output / drawn) as image:
                assert image.size == (2 * SHAPES_IMAGE_SIZE, CAPTION_HEIGHT + SHAPES_IMAGE_SIZE)


def test_visualize_refuses_a_class_list_other_than_the_models(trained_shapes_run, tmp_path, capsys):
    (tmp_path / "classes.csv").write_text("circle,0\nrectangle,1\n")
    image = os.path.join(trained_shapes_run.data_dir, "images", "val", "00000.png")
    (tmp_path / "val.csv").write_text(f"{image},,,,,\n")  # one image without boxes
    argv = ["--dataset", "csv", "--csv_val", str(tmp_path / "val.csv"), "--classes",
            str(tmp_path / "classes.csv"), "--output_dir", str(tmp_path / "drawn"), *inference_flags(trained_shapes_run)]
    assert visualize.main(argv) == 2
    error = capsys.readouterr().err
    assert "5 classes but the dataset has 2" in error and "Traceback" not in error
    assert not (tmp_path / "drawn").exists()
