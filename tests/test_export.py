"""ONNX export (tools/export_onnx.py): the exported network gives PyTorch's outputs at batch and image sizes other
than the traced one, and model.detect turns such outputs into model(images)'s detections."""

import json

import pytest
import torch

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True) translates the graph with it

from test_interop import load_tool  # noqa: E402

from retinanet.engine.checkpoint import save_checkpoint  # noqa: E402
from retinanet.engine.export import NetworkOutputs  # noqa: E402
from retinanet.engine.models import load_model  # noqa: E402
from retinanet.model import RetinaNet  # noqa: E402
from retinanet.settings import ModelSettings  # noqa: E402

CLASS_NAMES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A ResNet-18 RetinaNet checkpoint, exported by tools/export_onnx.py: (model, ONNX Runtime session)."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = RetinaNet(ModelSettings(num_classes=len(CLASS_NAMES), depth=18))
    save_checkpoint({"model": model.state_dict(), "class_names": CLASS_NAMES, "model_settings": model.settings.as_dict()},
                    str(root / "model.pt"))
    assert load_tool("export_onnx").main([str(root / "model.pt"), str(root / "model.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(root / "model.onnx"), providers=["CPUExecutionProvider"])
    return load_model(str(root / "model.pt")).model, session


@pytest.mark.parametrize("shape", [(1, 3, 96, 128), (3, 3, 100, 72)])  # traced at (1, 3, 320, 320)
def test_onnx_runtime_gives_pytorchs_outputs_at_other_sizes(exported, shape):
    model, session = exported
    images = torch.randn(shape)
    cls_logits, box_deltas = session.run(["cls_logits", "box_deltas"], {"images": images.numpy()})
    with torch.no_grad():
        expected_logits, expected_deltas = NetworkOutputs(model)(images)
    assert cls_logits.shape == expected_logits.shape and box_deltas.shape == expected_deltas.shape
    assert abs(torch.from_numpy(cls_logits) - expected_logits).max() < 1e-4
    assert abs(torch.from_numpy(box_deltas) - expected_deltas).max() < 1e-4


def test_the_onnx_file_says_its_classes_and_settings(exported):
    model, session = exported
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["class_names"]) == CLASS_NAMES
    assert json.loads(metadata["model_settings"]) == json.loads(json.dumps(model.settings.as_dict()))


def test_detect_on_the_network_outputs_is_the_models_own_inference():
    torch.manual_seed(1)
    model = RetinaNet(ModelSettings(num_classes=len(CLASS_NAMES), depth=18)).eval()
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        model.classification_subnet.output.bias.fill_(-2.5)  # scores near 0.08: detections to compare
        expected = model(images)
        found = model.detect(*NetworkOutputs(model)(images), padded_size=(96, 128))
    assert len(expected[0]["scores"]) > 0
    for mine, theirs in zip(found, expected):
        assert all(torch.equal(mine[key], theirs[key]) for key in ("boxes", "scores", "labels"))
