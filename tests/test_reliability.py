"""Faults and bad input in training: a killed run loses nothing, a stopped run saves, a bad loss or a full GPU
ends with a message, bad data is listed before training starts, and errors reach the user without a traceback."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import tiny_run_flags
from PIL import Image

import train

from retinanet import model as model_module
from retinanet.checkpoint import read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def wait_for_checkpoint(path, process, min_iteration: int, timeout: float = 240) -> dict:
    """Poll until `path` holds a checkpoint of at least `min_iteration`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        if os.path.exists(path):
            checkpoint = read_checkpoint(str(path))
            if checkpoint["iteration"] >= min_iteration:
                return checkpoint
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint of iteration {min_iteration} after {timeout} s")


# ------------------------------------------------------------------------------------------------ faults


@pytest.mark.slow
def test_sigkill_mid_epoch_leaves_a_complete_checkpoint_and_resume_continues_there(tmp_path):
    flags = tiny_run_flags(tmp_path, "--iters", "60", "--checkpoint_every", "1")
    process = subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(tmp_path / "out" / "last.pt", process, min_iteration=2)
    finally:
        process.kill()  # SIGKILL: no handler runs, whatever the process was doing
        process.communicate()
    killed_at = read_checkpoint(str(tmp_path / "out" / "last.pt"))  # complete, whenever the kill came
    assert 2 <= killed_at["iteration"] < 60  # mid-epoch: an epoch has 3 iterations of 4 images

    resumed = run_script(*tiny_run_flags(tmp_path, "--iters", str(killed_at["iteration"] + 2), "--resume",
                                     str(tmp_path / "out" / "last.pt")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'out' / 'last.pt'} at iteration {killed_at['iteration']}:" in resumed.stdout
    assert read_checkpoint(str(tmp_path / "out" / "last.pt"))["iteration"] == killed_at["iteration"] + 2


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_at_the_current_iteration(tmp_path):
    flags = tiny_run_flags(tmp_path, "--iters", "200", "--checkpoint_every", "1")
    process = subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(tmp_path / "out" / "last.pt", process, min_iteration=1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    saved = read_checkpoint(str(tmp_path / "out" / "last.pt"))
    assert f"stopped at iteration {saved['iteration']} and saved" in stdout
    assert 1 <= saved["iteration"] < 200 and saved["epoch"] == saved["iteration"] // 3


def nan_on_calls(monkeypatch, calls: set[int]) -> None:
    """Make the model's loss NaN on the given (0-based) calls."""
    original = model_module.retinanet_loss
    count = [0]

    def loss(*args, **kwargs):
        cls_loss, box_loss = original(*args, **kwargs)
        count[0] += 1
        if count[0] - 1 in calls:
            return cls_loss * float("nan"), box_loss
        return cls_loss, box_loss

    monkeypatch.setattr(model_module, "retinanet_loss", loss)


def test_nonfinite_loss_stops_the_run_with_iteration_lr_and_hint(tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, {1})
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_run_flags(tmp_path, "--iters", "3"))
    message = str(exit_info.value.code)
    assert "the loss is not finite at iteration 1 (lr 0.0002," in message  # warmup: 3e-4 * 2 / 3
    assert "--clip_grad" in message and "--skip_nonfinite" in message


def test_skip_nonfinite_skips_and_counts_such_batches(tmp_path, monkeypatch, capsys):
    nan_on_calls(monkeypatch, {1, 2})
    assert train.main(tiny_run_flags(tmp_path, "--iters", "4", "--skip_nonfinite")) == 0
    checkpoint = read_checkpoint(str(tmp_path / "out" / "last.pt"))
    assert checkpoint["iteration"] == 4 and checkpoint["skipped_batches"] == 2
    output = capsys.readouterr().out
    assert "1 skipped so far" in output and "2 skipped so far" in output  # each said as it is skipped


def test_out_of_memory_names_the_batch_and_what_to_lower(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model_module, "retinanet_loss", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_run_flags(tmp_path, "--iters", "1"))
    message = str(exit_info.value.code)
    assert "out of GPU memory on a batch of 4 images of 96x96 pixels" in message
    assert "--batch_size" in message and "--min_size" in message and "Tried to allocate 2.00 GiB" in message


def test_resume_from_a_checkpoint_of_another_depth_or_class_count_says_which(tmp_path):
    assert train.main(tiny_run_flags(tmp_path, "--iters", "1")) == 0
    checkpoint = str(tmp_path / "out" / "last.pt")
    with pytest.raises(ValueError, match=r"last.pt: the run was trained with depth 18 \(asked for: 34\)"):
        train.main(tiny_run_flags(tmp_path, "--iters", "2", "--depth", "34", "--resume", checkpoint))


# -------------------------------------------------------------------------------------------- bad input


def write_csv_data(tmp_path, rows: list[str]) -> list[str]:
    (tmp_path / "classes.csv").write_text("cat,0\ndog,1\n")
    (tmp_path / "train.csv").write_text("".join(f"{row}\n" for row in rows))
    return ["--dataset", "csv", "--csv_train", str(tmp_path / "train.csv"), "--classes",
            str(tmp_path / "classes.csv"), "--no_pretrained", "--depth", "18", "--min_size", "64", "--max_size", "64",
            "--output_dir", str(tmp_path / "out"), "--batch_size", "2"]


def save_image(path, width=64, height=48):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def truncated_png(path):
    save_image(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header, and so the size, is still readable


def test_dataloader_worker_errors_name_the_image_without_a_traceback(tmp_path):
    save_image(tmp_path / "good.png")
    truncated_png(tmp_path / "broken.png")
    flags = write_csv_data(tmp_path, ["good.png,1,2,30,40,cat", "broken.png,1,2,30,40,dog"])
    result = run_script(*flags, "--workers", "1", "--iters", "2", "--eval_every", "0")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "DataLoader worker" not in result.stderr
    assert f"error: {tmp_path / 'broken.png'}: cannot decode image" in result.stderr


def test_check_data_lists_every_problem_with_file_and_line(tmp_path, capsys):
    save_image(tmp_path / "good.png")
    save_image(tmp_path / "wide.png")
    truncated_png(tmp_path / "broken.png")
    rows = ["good.png,1,2,30,40,cat", "good.png,1,2,x,40,cat", "wide.png,50,2,90,40,dog", "wide.png,70,2,90,40,dog",
            "broken.png,,,,,", "gone.png,1,2,3,4,cat", "good.png,1,2,3,4,bird"]
    assert train.main(write_csv_data(tmp_path, rows) + ["--check_data"]) == 1
    output = capsys.readouterr().out
    train_csv = tmp_path / "train.csv"
    assert f"error: {train_csv}, line 2: x2 'x' is not a number" in output
    assert f"error: {train_csv}, line 7: unknown class 'bird'" in output
    assert f"error: {train_csv}, line 5: {tmp_path / 'broken.png'}: cannot decode image" in output
    assert f"error: {train_csv}, line 6: {tmp_path / 'gone.png'}: image file not found" in output
    assert (f"warning: {train_csv}, line 3: {tmp_path / 'wide.png'}: 2 box(es) reach past the 64x48 image: clipped, "
            f"1 of them dropped") in output
    assert f"{train_csv}: 4 error(s), 1 warning(s)" in output


def test_check_data_of_good_data_exits_zero_and_a_csv_error_mentions_the_check(tmp_path, capsys):
    save_image(tmp_path / "good.png")
    flags = write_csv_data(tmp_path, ["good.png,1,2,30,40,cat", "good.png,,,,,"])
    assert train.main(flags + ["--check_data"]) == 0
    assert "0 error(s), 0 warning(s)" in capsys.readouterr().out
    flags = write_csv_data(tmp_path, ["good.png,1,2,x,40,cat", "good.png,1,2,3,y,cat"])
    with pytest.raises(ValueError, match=r"line 1: x2 'x' is not a number.* \(and 1 more malformed row\(s\): "
                                         r"train.py --check_data lists them all\)"):
        train.main(flags)


def test_check_data_of_coco_reports_a_structure_error(tmp_path, capsys):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text('{"images": [], "annotations": []}')
    assert train.main(["--dataset", "coco", "--coco_path", str(tmp_path), "--check_data"]) == 1
    output = capsys.readouterr().out
    assert f"error: {tmp_path / 'annotations' / 'instances_train2017.json'}: not a COCO instances file" in output
    assert f"error: {tmp_path / 'annotations' / 'instances_val2017.json'}: COCO annotation file not found" in output


def test_images_of_one_pixel_and_smaller_than_the_largest_stride_train_and_detect(tmp_path):
    save_image(tmp_path / "dot.png", width=1, height=1)
    save_image(tmp_path / "small.png", width=20, height=12)  # smaller than P6's and P7's strides (64, 128)
    flags = write_csv_data(tmp_path, ["dot.png,0,0,1,1,cat", "small.png,2,2,18,10,dog", "small.png,,,,,"])
    flags += ["--csv_val", str(tmp_path / "train.csv"), "--min_size", "20", "--max_size", "20", "--workers", "0",
              "--iters", "2"]
    assert train.main(flags) == 0  # trains, and evaluates on the same images after the epoch
    checkpoint = read_checkpoint(str(tmp_path / "out" / "last.pt"))
    assert checkpoint["iteration"] == 2 and 0.0 <= checkpoint["best_map"] <= 1.0
