"""A CSV with a few boxes without area: an error naming the line by default; left out, counted by kind and named,
with --drop_degenerate_boxes (train.py, csv_eval.py, visualize.py, tools/make_tiles.py)."""

import os

import pytest
from conftest import save_image
from test_interop import load_tool

import csv_eval
import train

from retinanet.dataloader import CSVDataset


def write_csv(tmp_path) -> tuple[str, str]:
    for name in ("a.png", "b.png", "c.png"):
        save_image(tmp_path / name, 64, 48)
    rows = ["a.png,1,2,30,40,cat",
            "a.png,10,10,10,20,cat",  # line 2: zero width
            "b.png,5,5,20,20,cat",
            "b.png,30,5,20,20,cat",  # line 4: x2 < x1
            "c.png,8,8,8,8,cat"]  # line 5: c.png's only box, zero area: c.png is left out
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "classes.csv").write_text("cat,0\n")
    return str(tmp_path / "train.csv"), str(tmp_path / "classes.csv")


def test_degenerate_boxes_stop_the_run_by_default_naming_the_line(tmp_path):
    annotations, classes = write_csv(tmp_path)
    with pytest.raises(ValueError, match=r"train.csv, line 2: empty box \(10.0, 10.0, 10.0, 20.0\)"):
        CSVDataset(annotations, classes)


def test_dropped_boxes_are_counted_by_kind_and_the_first_named(tmp_path, capsys):
    annotations, classes = write_csv(tmp_path)
    dataset = CSVDataset(annotations, classes, drop_degenerate=True)
    message = capsys.readouterr().out  # printed as the scripts' other messages are
    assert "dropped 3 box(es) without area (2 zero width or height, 1 corners swapped (x2 < x1 or y2 < y1))" in message
    assert "line 2" in message and "line 4" in message and "line 5" in message
    assert [path.rsplit("/", 1)[1] for path in dataset.image_paths] == ["a.png", "b.png"]
    assert [len(boxes) for boxes in dataset.annotations] == [1, 1]


def test_train_py_drops_them_when_asked(tmp_path, capsys):
    annotations, classes = write_csv(tmp_path)
    flags = ["--dataset", "csv", "--csv_train", annotations, "--classes", classes, "--no_pretrained",
             "--depth", "18", "--min_size", "64", "--max_size", "64", "--batch_size", "2", "--iters", "1",
             "--workers", "0", "--eval_every", "0", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="line 2"):
        train.main(flags)
    assert train.main([*flags, "--drop_degenerate_boxes"]) == 0
    assert "dropped 3 box" in capsys.readouterr().out


def test_the_evaluation_and_tiling_scripts_drop_them_when_asked(trained_shapes_run, tmp_path, capsys):
    data = trained_shapes_run.data_dir
    image = os.path.join(data, "images", "val", "00000.png")
    annotations = tmp_path / "val.csv"
    annotations.write_text(f"{image},10,10,40,40,circle\n{image},50,50,50,70,rectangle\n")  # line 2: zero width
    classes = os.path.join(data, "classes.csv")
    evaluation = ["--csv_val", str(annotations), "--classes", classes, "--model",
                  trained_shapes_run.checkpoint, "--device", "cpu"]
    tiling = ["--csv_train", str(annotations), "--classes", classes, "--tile_size", "64",
              "--output_dir", str(tmp_path / "tiles")]
    for main, flags in ((csv_eval.main, evaluation), (load_tool("make_tiles").main, tiling)):
        assert main(flags) == 2
        assert "val.csv, line 2: empty box" in capsys.readouterr().err
        assert main([*flags, "--drop_degenerate_boxes"]) == 0
        assert "dropped 1 box" in capsys.readouterr().out
