"""ONNX export (tools/export_onnx.py): the exported network gives PyTorch's outputs at batch and image sizes other
than the traced one, and model.detect turns such outputs into model(images)'s detections; the exported detector
(--detections) gives model(images)'s detections itself, in ONNX Runtime, on shapes images of several sizes."""

import json

import pytest
import torch

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True) translates the graph with it

from test_interop import load_tool  # noqa: E402

from retinanet.checkpoint import load_model, save_checkpoint
from retinanet.data.shapes import SHAPE_CLASSES, make_shapes_dataset  # noqa: E402
from retinanet.dataloader import read_rgb_image  # noqa: E402
from retinanet.extras.export import DetectionGraph, NetworkOutputs  # noqa: E402
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


# ------------------------------------------------------------------------------------------ the whole detector

CAP = 60  # --max_detections of the export: some images of 160 pixels reach it, those of 96 do not


def spread_model() -> RetinaNet:
    """A ResNet-18 RetinaNet for the 5 shape classes whose scores spread (classification output weights 50 times
    their initial ones, bias -4.5): 17 to 60+ detections on the test images, and no two of the best within the
    1e-6 that ONNX Runtime's convolutions move scores by (near ties at initialisation's scores of about 0.01 would
    swap, and NMS would then keep other boxes)."""
    torch.manual_seed(0)
    model = RetinaNet(ModelSettings(num_classes=len(SHAPE_CLASSES), depth=18))
    with torch.no_grad():
        model.classification_subnet.output.weight.mul_(50.0)
        model.classification_subnet.output.bias.fill_(-4.5)
    return model.eval()


@pytest.fixture(scope="module")
def exported_detector(tmp_path_factory):
    """spread_model exported by `tools/export_onnx.py --detections --max_detections 60`: (the model with that cap,
    ONNX Runtime session, root folder)."""
    root = tmp_path_factory.mktemp("export_detector")
    model = spread_model()
    save_checkpoint({"model": model.state_dict(), "class_names": list(SHAPE_CLASSES),
                     "model_settings": model.settings.as_dict()}, str(root / "model.pt"))
    flags = [str(root / "model.pt"), str(root / "detector.onnx"), "--detections", "--max_detections", str(CAP)]
    assert load_tool("export_onnx").main(flags) == 0
    session = onnxruntime.InferenceSession(str(root / "detector.onnx"), providers=["CPUExecutionProvider"])
    return load_model(str(root / "model.pt"), max_detections=CAP).model, session, root


def shapes_batch(root, size: int, count: int) -> torch.Tensor:
    """`count` shapes images of size x size pixels as a (count, 3, size, size) float batch in 0..1."""
    make_shapes_dataset(str(root / f"shapes{size}"), "test", count, image_size=size)
    folder = root / f"shapes{size}" / "images" / "test"
    return torch.stack([read_rgb_image(str(folder / f"{i:05d}.png")) for i in range(count)]).float() / 255


@pytest.mark.parametrize("size, count", [(160, 3), (96, 2), (224, 1)])  # traced at a batch of 2 of 320 x 320
def test_the_exported_detector_gives_the_models_detections(exported_detector, size, count):
    model, session, root = exported_detector
    images = shapes_batch(root, size, count)
    boxes, scores, labels, num_detections = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = model(images)
    assert boxes.shape == (count, CAP, 4) and scores.shape == labels.shape == (count, CAP)
    for image, theirs in enumerate(expected):
        found = int(num_detections[image])
        assert found == len(theirs["scores"]) and found > 0
        assert abs(torch.from_numpy(boxes[image, :found]) - theirs["boxes"]).max() < 1e-3  # pixels
        assert abs(torch.from_numpy(scores[image, :found]) - theirs["scores"]).max() < 1e-4
        assert torch.equal(torch.from_numpy(labels[image, :found]), theirs["labels"])
        assert (labels[image, found:] == -1).all() and (scores[image, found:] == 0).all()  # padding
        assert (boxes[image, found:] == 0).all()
    assert (max(num_detections) == CAP) == (size >= 160)  # the cap is reached in the larger images only


def test_the_exported_detector_holds_the_settings_it_was_exported_with(exported_detector):
    model, session, _ = exported_detector
    settings = json.loads(session.get_modelmeta().custom_metadata_map["model_settings"])
    assert settings["max_detections"] == CAP and settings == json.loads(json.dumps(model.settings.as_dict()))
    assert [output.name for output in session.get_outputs()] == ["boxes", "scores", "labels", "num_detections"]


def test_detection_graph_keeps_what_the_models_inference_keeps_in_pytorch_too():
    model = spread_model()
    images = torch.rand(2, 3, 128, 96)
    with torch.no_grad():
        expected = model(images)
        boxes, scores, labels, num_detections = DetectionGraph(model)(images)
    for image, theirs in enumerate(expected):
        found = int(num_detections[image])
        assert found == len(theirs["scores"]) > 0
        torch.testing.assert_close(boxes[image, :found], theirs["boxes"], rtol=0, atol=1e-4)
        assert torch.equal(scores[image, :found], theirs["scores"]) and torch.equal(labels[image, :found],
                                                                                   theirs["labels"])


def test_inference_flags_without_detections_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_tool("export_onnx").main([str(tmp_path / "model.pt"), str(tmp_path / "out.onnx"), "--nms_threshold", "0.6"])
    assert "only change an export with --detections" in capsys.readouterr().err
