import os

import pytest
import torch

from retinanet.checkpoint import load_model, read_checkpoint, save_checkpoint
from retinanet.extras.interop import infer_architecture
from retinanet.model import RetinaNet
from retinanet.settings import ModelSettings


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_architecture_is_inferred_from_a_state_dict(depth):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        state_dict = RetinaNet(ModelSettings(num_classes=7, depth=depth)).state_dict()
    assert infer_architecture(state_dict) == (depth, 7, 9)


def test_checkpoint_round_trip_keeps_weights_settings_and_names(tmp_path):
    model = RetinaNet(ModelSettings(num_classes=3, depth=18, score_threshold=0.2, max_detections=17))
    path = str(tmp_path / "model.pt")
    save_checkpoint({"model": model.state_dict(), "class_names": ["a", "b", "c"],
                     "model_settings": model.settings.as_dict()}, path)
    assert os.listdir(tmp_path) == ["model.pt"]  # the temporary file was renamed away
    loaded, class_names = load_model(path)
    assert class_names == ["a", "b", "c"] and loaded.settings == model.settings
    assert not loaded.training
    assert loaded.settings.score_threshold == 0.2 and loaded.settings.max_detections == 17
    torch.testing.assert_close(loaded.fpn.p6.weight, model.fpn.p6.weight)


def test_a_bare_state_dict_loads_with_numbered_class_names(tmp_path):
    path = str(tmp_path / "state_dict.pt")
    torch.save(RetinaNet(ModelSettings(num_classes=2, depth=18)).state_dict(), path)
    model, class_names = load_model(path)
    assert model.num_classes == 2 and class_names == ["0", "1"]
    # yhenon's recipe: its box coding and its resizer's 608 / 1024 pixels
    assert model.settings.box_coder_std == (0.1, 0.1, 0.2, 0.2) and model.settings.smooth_l1_beta == 1 / 9
    assert (model.settings.min_size, model.settings.max_size) == (608, 1024)


class Payload:
    """Unpickling this object would create a file: the stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "malicious.pt"
    torch.save({"model": Payload(str(marker))}, path)
    with pytest.raises(ValueError, match="refused"):
        read_checkpoint(str(path))
    assert not marker.exists()


def test_missing_directory_and_truncated_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_checkpoint(str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="directory"):
        read_checkpoint(str(tmp_path))
    path = tmp_path / "truncated.pt"
    torch.save(RetinaNet(ModelSettings(num_classes=2, depth=18)).state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        read_checkpoint(str(path))
