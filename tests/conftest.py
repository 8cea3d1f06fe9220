"""Shared helpers and fixtures: small image and CSV files written by hand, and a checkpoint from a short training
run on a tiny shapes set, made once per test session."""

from typing import NamedTuple

import pytest
from PIL import Image

import train

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


class TrainedRun(NamedTuple):
    """Where a finished training run left its files."""

    checkpoint: str  # last.pt of the run
    data_dir: str  # the shapes data: {data_dir}/val.csv, classes.csv, annotations/instances_val.json, images/val/


def tiny_run_flags(tmp_path, *extra: str) -> list[str]:
    """train.py flags for a seconds-long run of the shapes demo in tmp_path: 12 training and 4 validation images of
    96 pixels, batches of 4 (3 iterations an epoch), no evaluation; `extra` flags are appended."""
    return [
        "--data_dir", str(tmp_path / "shapes"), "--output_dir", str(tmp_path / "out"),
        "--shapes_train", "12", "--shapes_val", "4", "--batch_size", "4", "--min_size", "96", "--max_size", "96",
        "--workers", "0", "--eval_every", "0", "--warmup_iters", "3", *extra,
    ]


@pytest.fixture(scope="session")
def trained_shapes_run(tmp_path_factory) -> TrainedRun:
    """Two iterations of training on 12 shapes images (4 for validation) at 96 pixels, on the CPU. The model
    detects little: tests of the scripts check files and formats, not accuracy."""
    root = tmp_path_factory.mktemp("trained_shapes_run")
    flags = tiny_run_flags(root, "--iters", "2", "--device", "cpu")
    assert train.main(flags) == 0
    return TrainedRun(checkpoint=str(root / "out" / "last.pt"), data_dir=str(root / "shapes"))
