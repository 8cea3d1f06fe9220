"""Tests of Pascal VOC data (retinanet/voc.py, VOCDataset): a VOC root and a LabelImg folder written here, VOC's
1-based boxes, classes, sets, difficult boxes in evaluation (against a hand-computed AP), the errors a user can
cause and --check_data, and a one-epoch training run that evaluates, then csv_eval.py on its checkpoint."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval import average_precisions

import csv_eval
import train
import visualize

from retinanet import evaluation
from retinanet.checkpoint import read_checkpoint, save_checkpoint
from retinanet.data import voc
from retinanet.data.voc import VOC_CLASSES, VOCDataset, VOCSet, read_voc_set, run_class_names, training_sets
from retinanet.diagnostics.check import check_data, check_voc
from retinanet.model import RetinaNet
from retinanet.settings import ModelSettings

WIDTH, HEIGHT = 64, 48
# id -> objects (name, (xmin, ymin, xmax, ymax) 1-based inclusive as VOC writes them, difficult, truncated)
OBJECTS = {
    "000001": [("cell", (5, 6, 20, 30), 0, 0), ("nucleus", (30, 10, 40, 20), 1, 0)],
    "000002": [("cell", (40, 20, 64, 48), 0, 1)],  # truncated: it reaches the image's last pixels
    "000003": [],  # no objects
    "000004": [("nucleus", (10, 12, 26, 28), 0, 0), ("cell", (35, 5, 60, 40), 0, 0)],
    "000005": [("cell", (8, 8, 30, 40), 0, 0)],
    "000006": [("nucleus", (20, 15, 50, 35), 0, 0), ("nucleus", (2, 2, 12, 12), 1, 0)],
}
SETS = {"trainval": ["000001", "000002", "000003", "000004"], "test": ["000005", "000006"]}


def voc_xml(filename: str | None, objects, width: int = WIDTH, height: int = HEIGHT) -> str:
    """A VOC annotation file; the i-th <object> starts on line 4 + 6 i."""
    lines = ["<annotation>", f"  <filename>{filename}</filename>" if filename else "  <folder>x</folder>",
             f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, (xmin, ymin, xmax, ymax), difficult, truncated in objects:
        lines += ["  <object>", f"    <name>{name}</name>", f"    <truncated>{truncated}</truncated>",
                  f"    <difficult>{difficult}</difficult>",
                  f"    <bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>",
                  "  </object>"]
    return "\n".join(lines + ["</annotation>"]) + "\n"


def write_voc_root(root, objects=OBJECTS, sets=SETS):
    """A VOC root: Annotations/{id}.xml, JPEGImages/{id}.jpg (each object drawn as a filled rectangle),
    ImageSets/Main/{set}.txt."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for image_id, image_objects in objects.items():
        pixels = np.full((HEIGHT, WIDTH, 3), 90, dtype=np.uint8)
        for name, (xmin, ymin, xmax, ymax), _, _ in image_objects:
            pixels[ymin - 1:ymax, xmin - 1:xmax] = (230, 40, 40) if name == "cell" else (40, 40, 230)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.jpg", image_objects))
    for name, ids in sets.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{image_id}\n" for image_id in ids))
    return root


@pytest.fixture
def voc2007(tmp_path):
    return write_voc_root(tmp_path / "VOCdevkit" / "VOC2007")


# ---------------------------------------------------------------------------------------------------- reading


def test_a_voc_root_reads_its_sets_with_one_based_boxes_difficult_flags_and_the_names_found(voc2007):
    dataset = VOCDataset([str(voc2007)], "trainval")
    assert dataset.class_names == ["cell", "nucleus"]  # not VOC's names: the sorted names found
    assert [path.rsplit("/", 1)[1] for path in dataset.image_paths] == [f"{i}.jpg" for i in SETS["trainval"]]
    # xmin 5 .. xmax 20 are the pixels 4 .. 19 counted from 0: x1 = 4, x2 = 20
    np.testing.assert_array_equal(dataset.load_annotations(0), [[4, 5, 20, 30, 0], [29, 9, 40, 20, 1]])
    assert dataset.load_difficult(0).tolist() == [False, True]
    np.testing.assert_array_equal(dataset.load_annotations(1), [[39, 19, 64, 48, 0]])  # truncated, in the image
    assert dataset.load_annotations(2).shape == (0, 5) and dataset.load_difficult(2).shape == (0,)
    item = dataset[0]
    assert item["difficult"].tolist() == [False, True] and item["image"].shape == (3, HEIGHT, WIDTH)
    assert not dataset.use_07_metric and VOCDataset([str(voc2007)], "test").use_07_metric  # VOC2007's test set


def test_voc_names_give_the_twenty_voc_classes_and_a_class_list_its_own(voc2007, tmp_path):
    objects = {"1": [("dog", (1, 1, 9, 9), 0, 0)], "2": [("person", (2, 2, 8, 8), 0, 0), ("cat", (3, 3, 9, 9), 0, 0)]}
    root = write_voc_root(tmp_path / "VOC2012", objects, {"train": ["1", "2"]})
    dataset = VOCDataset([str(root)], "train")
    assert dataset.class_names == list(VOC_CLASSES) and len(VOC_CLASSES) == 20
    assert dataset.load_annotations(1)[:, 4].tolist() == [VOC_CLASSES.index("person"), VOC_CLASSES.index("cat")]
    assert VOCDataset([str(root)], "train", ["person", "cat", "dog"]).load_annotations(1)[:, 4].tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"Annotations/2\.xml, line 10: unknown class 'cat'; the class list has "
                                         r"\['person', 'dog'\]"):
        VOCDataset([str(root)], "train", ["person", "dog"])


def test_a_labelimg_folder_is_one_set_of_xml_files_next_to_their_images(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "photo one.png")
    Image.new("RGB", (20, 50)).save(tmp_path / "b.jpg")
    (tmp_path / "a.xml").write_text(voc_xml("photo one.png", [("car", (2, 3, 10, 12), 0, 0)], 40, 30))
    (tmp_path / "b.xml").write_text(voc_xml(None, [], 20, 50))  # no <filename>: the image named like the file
    dataset = VOCDataset([str(tmp_path)], "whatever")
    assert dataset.image_paths == [str(tmp_path / "photo one.png"), str(tmp_path / "b.jpg")]
    assert dataset.class_names == list(VOC_CLASSES) and dataset.image_sizes[1] == (50, 20)


def test_training_reads_07_and_12_trainval_and_validates_on_07_test(voc2007, tmp_path):
    voc2012 = write_voc_root(tmp_path / "VOCdevkit" / "VOC2012", sets={"trainval": ["000001"]})  # no test set
    train_set, val_set = training_sets([str(voc2007), str(voc2012)], "trainval", "test")
    assert train_set == VOCSet((str(voc2007), str(voc2012)), "trainval") and val_set == VOCSet((str(voc2007),), "test")
    assert len(VOCDataset(*train_set)) == 5
    assert training_sets([str(tmp_path)], "trainval", "test")[1] is None  # a folder of XML files: no validation
    assert training_sets([str(tmp_path)], "a", "b", [str(voc2012)])[1] == VOCSet((str(voc2012),), "b")


def test_a_run_reads_each_xml_file_once_and_check_data_once_more(voc2007, monkeypatch, capsys):
    parsed, parse_xml = [], voc.parse_xml

    def counted_parse_xml(path):
        parsed.append(path)
        return parse_xml(path)

    monkeypatch.setattr(voc, "parse_xml", counted_parse_xml)
    run, _ = train.decide(train.parse_args(["--dataset", "voc", "--voc_path", str(voc2007)]), None, world_size=1)
    train_set, val_set = train.build_datasets(run)
    assert len(train_set) + len(val_set) == len(parsed) == 6 and train_set.class_names == ["cell", "nucleus"]
    parsed.clear()
    voc_sets = training_sets(run.voc_path, run.train_set, run.val_set, run.voc_val)
    assert check_data(voc=voc_sets, workers=1) and len(parsed) == 6  # classes and check: one read


def test_set_names_default_per_dataset_and_voc_needs_its_path(capsys):
    args = train.parse_args(["--dataset", "voc", "--voc_path", "VOC2007", "VOC2012"])
    run, _ = train.decide(args, None, world_size=1)
    assert (run.train_set, run.val_set, run.epochs, run.settings["depth"]) == ("trainval", "test", 18, 50)
    assert args.train_set is None and args.val_set is None  # the flags as typed
    coco, _ = train.decide(train.parse_args(["--dataset", "coco", "--coco_path", "x", "--val_set", "minival"]), None, 1)
    assert (coco.train_set, coco.val_set) == ("train2017", "minival")
    with pytest.raises(SystemExit):
        train.parse_args(["--dataset", "voc"])
    assert "--dataset voc needs --voc_path" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- errors


BAD_OBJECTS = [
    # (<object> content, what the message says)
    ("<name>cell</name>", "<object> 'cell' has no <bndbox> with <xmin>, <ymin>, <xmax> and <ymax>"),
    ("<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox>", "<object> without a <name>"),
    ("<name>cell</name><bndbox><xmin>1</xmin><ymin>x</ymin><xmax>2</xmax><ymax>2</ymax></bndbox>",
     "<ymin> 'x' is not a number"),
    ("<name>cell</name><bndbox><xmin>9</xmin><ymin>1</ymin><xmax>3</xmax><ymax>2</ymax></bndbox>",
     "empty box of 'cell' (xmin 9, ymin 1, xmax 3, ymax 2); expected xmax >= xmin"),
    ("<name>cell</name><difficult>yes</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax>"
     "</bndbox>", "<difficult> of 'cell' is 'yes'; expected 0 or 1"),
]


@pytest.mark.parametrize("content, message", BAD_OBJECTS)
def test_a_bad_object_is_an_error_naming_the_file_and_its_line(tmp_path, content, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "a.xml").write_text(f"<annotation>\n<filename>a.jpg</filename>\n\n<object>{content}</object>\n"
                                    f"</annotation>\n")
    with pytest.raises(ValueError, match=f"a.xml, line 4: {message}".replace("(", r"\(").replace(")", r"\)")):
        VOCDataset([str(tmp_path)], "train")


def test_files_sets_and_images_that_are_missing_or_malformed_are_named(voc2007, tmp_path):
    (voc2007 / "Annotations" / "000002.xml").write_text("<annotation>\n  <object>\n</annotation>\n")
    with pytest.raises(ValueError, match=r"000002\.xml, line 3: malformed XML \(mismatched tag\)"):
        VOCDataset([str(voc2007)], "trainval")
    with pytest.raises(ValueError, match=r"ImageSets/Main/val\.txt: list of the set 'val' not found"):
        VOCDataset([str(voc2007)], "val")
    (voc2007 / "JPEGImages" / "000005.jpg").unlink()
    with pytest.raises(ValueError, match=r"1 of 2 image files not found, e\.g\. .*000005\.xml: .*000005\.jpg"):
        VOCDataset([str(voc2007)], "test")
    with pytest.raises(ValueError, match="no XML files in this folder"):
        VOCDataset([str(tmp_path / "VOCdevkit")], "test")


def test_check_data_lists_malformed_xml_unknown_classes_and_boxes_past_the_image(voc2007, tmp_path, capsys):
    annotations = voc2007 / "Annotations"
    (annotations / "000002.xml").write_text("<annotation>\n  <object>\n</annotation>\n")
    (annotations / "000004.xml").write_text(voc_xml("000004.jpg", [("cell", (1, 1, 9, 9), 0, 0),
                                                                   ("cell", (50, 40, 70, 60), 0, 0)]))
    (annotations / "000006.xml").write_text(voc_xml("000006.jpg", [("cell", (1, 1, 9, 9), 0, 0),
                                                                   ("virus", (2, 2, 5, 5), 0, 0)]))
    (tmp_path / "classes.csv").write_text("cell,0\nnucleus,1\n")
    flags = ["--dataset", "voc", "--voc_path", str(voc2007), "--classes", str(tmp_path / "classes.csv")]
    assert train.main(flags + ["--check_data", "--workers", "1"]) == 1
    output = capsys.readouterr().out
    assert f"error: {annotations / '000002.xml'}, line 3: malformed XML (mismatched tag)" in output
    assert f"error: {annotations / '000006.xml'}, line 10: unknown class 'virus'" in output
    assert (f"warning: {annotations / '000004.xml'}, line 10: {voc2007 / 'JPEGImages' / '000004.jpg'}: 1 box(es) "
            f"reach past the 64x48 image: clipped, 0 of them dropped") in output
    assert f"VOC set trainval of {voc2007}: 1 error(s), 1 warning(s)" in output
    assert f"VOC set test of {voc2007}: 1 error(s), 0 warning(s)" in output
    assert check_voc(VOCSet((str(voc2007),), "test"), ["cell", "nucleus", "virus"], workers=1) == []
    parsed_sets = [read_voc_set(voc_set) for voc_set in training_sets([str(voc2007)], "trainval", "test")]
    assert run_class_names(None, parsed_sets) == ["cell", "nucleus", "virus"]


# ------------------------------------------------------------------------------------------------- evaluation


def test_ap_leaves_difficult_boxes_out_as_computed_by_hand(tmp_path):
    # Image 1: a cell A and a difficult cell B; image 2: a cell C. Detections by decreasing score: on B (neither a
    # hit nor a miss), on A (hit), nowhere (false positive), on C (hit). Counted: hit, miss, hit over 2 boxes:
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1. All-point AP 1/2 x 1 + 1/2 x 2/3 = 5/6; 11-point AP, at recall
    # 0, 0.1, ..., 0.5 precision 1, at 0.6 .. 1 precision 2/3: (6 + 5 x 2/3) / 11 = 28/33.
    objects = {"1": [("cell", (1, 1, 10, 10), 0, 0), ("cell", (21, 21, 30, 30), 1, 0)],
               "2": [("cell", (11, 11, 20, 20), 0, 0)]}
    root = write_voc_root(tmp_path / "VOC2007", objects, {"test": ["1", "2"]})
    dataset = VOCDataset([str(root)], "test")

    def found(*boxes_and_scores):
        return {"boxes": np.array([box for box, _ in boxes_and_scores], np.float32).reshape(-1, 4),
                "scores": np.array([score for _, score in boxes_and_scores], np.float32),
                "labels": np.zeros(len(boxes_and_scores), np.int64), "image_size": (HEIGHT, WIDTH)}

    predictions = [found(([20, 20, 30, 30], 0.9), ([0, 0, 10, 10], 0.8), ([40, 30, 50, 40], 0.7)),
                   found(([10, 10, 20, 20], 0.6))]
    assert evaluation.evaluate(predictions, dataset, use_07_metric=False)["mAP"] == pytest.approx(5 / 6)
    result = evaluation.evaluate(predictions, dataset)  # VOC2007's test set: the 11-point AP by default
    assert result["mAP"] == pytest.approx(28 / 33) and result["per_class"]["annotations"].tolist()[0] == 2
    # Without its flag, B is a box like any other: hits at 0.9 and 0.8, a false positive, a hit, over 3 boxes:
    # precision 1, 1, 2/3, 3/4 at recall 1/3, 2/3, 2/3, 1; AP (1 + 1 + 3/4) / 3 = 11/12.
    detections = [[np.c_[prediction["boxes"], prediction["scores"]]] for prediction in predictions]
    annotations = [[dataset.load_annotations(i)[:, :4]] for i in range(2)]
    assert average_precisions(detections, annotations)[0] == (pytest.approx(11 / 12), 3)


def test_a_voc_set_with_the_models_classes_reads_the_checkpoint_once(voc2007, tmp_path, monkeypatch):
    model = RetinaNet(ModelSettings(num_classes=2, depth=18))
    path = str(tmp_path / "model.pt")
    save_checkpoint({"model": model.state_dict(), "class_names": ["cell", "nucleus"],
                     "model_settings": model.settings.as_dict()}, path)
    loads = []

    def counted_load(file, *args, **kwargs):
        loads.append(file)
        return torch.serialization.load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted_load)
    flags = ["--voc_path", str(voc2007), "--model", path, "--device", "cpu", "--min_size", "64", "--max_size", "64"]
    assert csv_eval.main(flags) == 0 and loads == [path]
    loads.clear()
    flags = ["--dataset", "voc", "--anchors", "--output_dir", str(tmp_path / "anchors"), "--limit", "1"] + flags[:4]
    assert visualize.main(flags) == 0 and loads == [path]


# ----------------------------------------------------------------------------------------------------- training


def test_one_epoch_on_voc_with_augmentation_then_csv_eval_on_its_checkpoint(voc2007, tmp_path, capsys):
    flags = ["--dataset", "voc", "--voc_path", str(voc2007), "--epochs", "1", "--depth", "18", "--no_pretrained",
             "--min_size", "64", "--max_size", "64", "--batch_size", "2", "--workers", "0", "--warmup_iters", "1",
             "--output_dir", str(tmp_path / "out"), "--augment", "photometric", "crop", "--device", "cpu"]
    assert train.main(flags) == 0
    checkpoint = read_checkpoint(str(tmp_path / "out" / "best.pt"))  # evaluated on VOC2007's test set after the epoch
    assert checkpoint["class_names"] == ["cell", "nucleus"] and checkpoint["iteration"] == 2  # 4 images, batches of 2
    assert checkpoint["args"]["augment"] == ["photometric", "crop"] and checkpoint["args"]["val_set"] == "test"
    assert 0.0 <= checkpoint["best_map"] <= 1.0
    output = capsys.readouterr().out
    assert "AP at IoU 0.5 (11-point VOC2007)" in output
    argv = ["--voc_path", str(voc2007), "--model", str(tmp_path / "out" / "best.pt"), "--device", "cpu", "--no_voc07"]
    assert csv_eval.main(argv) == 0
    output = capsys.readouterr().out
    assert "all-point VOC2010+" in output and "mAP: " in output and "2 images of VOC set test" in output
