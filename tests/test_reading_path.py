"""The reading path stays short: what one training run and one prediction execute, measured by tools/reading_path.py
(sys.setprofile over the run: the files whose functions ran, a script whole, each function that ran from its def to
its last line); train.py and the README stay short too."""

import pathlib

import pytest
import train

from retinanet.data.shapes import make_shapes_dataset
from tools.reading_path import measure_script

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRAINING_PATH = (10, 1400)  # files, lines: yhenon/pytorch-retinanet's training path is 7 files, nanoGPT's 2
PREDICTION_PATH = (7, 800)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("reading_path")
    make_shapes_dataset(str(root / "shapes"), "train", 8, image_size=96, seed=1)
    make_shapes_dataset(str(root / "shapes"), "val", 4, image_size=96, seed=2)
    return root


def test_a_csv_training_run_with_validation_reads_in_ten_files(shapes):
    # --workers 0: the data loading runs in this process, where the profiler sees it
    flags = ["--dataset", "csv", "--csv_train", str(shapes / "shapes" / "train.csv"), "--classes",
             str(shapes / "shapes" / "classes.csv"), "--csv_val", str(shapes / "shapes" / "val.csv"), "--iters", "2",
             "--workers", "0", "--depth", "18", "--no_pretrained", "--min_size", "96", "--max_size", "96",
             "--batch_size", "4", "--output_dir", str(shapes / "out"), "--device", "cpu"]
    status, path = measure_script("train.py", flags)
    assert status == 0 and (shapes / "out" / "best.pt").exists()  # it trained, validated and kept its best
    assert set(path.files) == {"train.py", "retinanet/settings.py", "retinanet/model.py", "retinanet/anchors.py",
                               "retinanet/losses.py", "retinanet/inference.py", "retinanet/dataloader.py",
                               "retinanet/evaluation.py", "retinanet/checkpoint.py", "retinanet/training.py"}
    assert len(path.files) <= TRAINING_PATH[0] and path.total_lines <= TRAINING_PATH[1], path.describe()


def test_a_prediction_on_a_folder_reads_in_seven_files_without_tiling(shapes):
    assert train.main(["--data_dir", str(shapes / "demo"), "--output_dir", str(shapes / "demo_out"), "--shapes_train",
                       "8", "--shapes_val", "4", "--iters", "1", "--batch_size", "4", "--min_size", "96",
                       "--max_size", "96", "--workers", "0", "--eval_every", "0", "--device", "cpu"]) == 0
    flags = ["--model", str(shapes / "demo_out" / "last.pt"), str(shapes / "shapes" / "images" / "val"), "--output",
             str(shapes / "found.csv"), "--workers", "0", "--device", "cpu"]
    status, path = measure_script("predict.py", flags)
    assert status == 0 and (shapes / "found.csv").exists()
    assert len(path.files) <= PREDICTION_PATH[0] and path.total_lines <= PREDICTION_PATH[1], path.describe()
    # nothing the run did not ask for: no tiling, drawing, diagnostics or other formats, which live one level down
    assert all(file.count("/") <= 1 for file in path.files), path.describe()


def test_train_py_and_the_readme_stay_short():
    assert len((ROOT / "train.py").read_text().splitlines()) <= 300
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
