"""Tests of retinanet/engine/drawing.py and visualize.py without a trained model: the drawing on synthetic images, the
files written for a folder of images and for an annotated set (with a detector that returns fixed boxes), and the
errors a user can cause (those found after the model is loaded with the session's short training run).
tests/test_scripts.py runs the script end to end with a trained checkpoint."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_voc import voc_xml
from torch import nn

import visualize

from retinanet.data.augmentations import Augmentation
from retinanet.data.voc import VOCDataset
from retinanet.dataloader import CSVDataset, DetectionDataset, TrainingSampler, build_transform, read_rgb_image
from retinanet.extras import drawing
from retinanet.settings import ModelSettings

CLASS_NAMES = ["cat", "dog", "cow"]
GRAY = 100  # the value of every pixel of the synthetic images


def gray_image(height: int = 64, width: int = 80) -> torch.Tensor:
    return torch.full((3, height, width), GRAY, dtype=torch.uint8)


def color_at(image: torch.Tensor, x: int, y: int) -> tuple[int, ...]:
    return tuple(image[:, y, x].tolist())


class FixedDetector(nn.Module):
    """Finds the same two objects in every image, in input pixels: a dog at (4, 6, 24, 30) with score 0.9 and a
    cat at (2, 34, 12, 44) with score 0.3. With the default transform (no resize) input pixels are image pixels;
    plain images (visualize_images) are resized by its settings, at scale 1 where their shorter side is 40."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # predict_dataset reads the device from the parameters
        self.settings = ModelSettings(num_classes=len(CLASS_NAMES), min_size=40, max_size=1000)

    def forward(self, images: torch.Tensor, image_sizes=None) -> list[dict[str, torch.Tensor]]:
        return [{"boxes": torch.tensor([[4.0, 6.0, 24.0, 30.0], [2.0, 34.0, 12.0, 44.0]]),
                 "scores": torch.tensor([0.9, 0.3]), "labels": torch.tensor([1, 0])} for _ in images]


def save_gray(path, width: int, height: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (GRAY, GRAY, GRAY)).save(path)
    return str(path)


# ---------------------------------------------------------------------------------------------------- drawing


def test_box_outline_takes_the_class_colour_and_far_pixels_stay():
    image = gray_image()
    drawn = drawing.draw_boxes(image, np.array([[10.0, 20.0, 50.0, 56.0]]), np.array([1]), CLASS_NAMES,
                                 scores=np.array([0.9]))
    dog = drawing.class_colors(3)[1]
    # The outline, 2 pixels wide inside the box (the label is written in its top-left corner, above y = 40)
    assert color_at(drawn, 10, 45) == dog and color_at(drawn, 11, 45) == dog  # left edge
    assert color_at(drawn, 50, 45) == dog  # right edge
    assert color_at(drawn, 30, 56) == dog and color_at(drawn, 30, 55) == dog  # bottom edge
    assert color_at(drawn, 30, 45) == (GRAY,) * 3  # not filled
    assert torch.all(drawn[:, 58:, :] == GRAY) and torch.all(drawn[:, :, :9] == GRAY)  # below and left of the box
    assert torch.all(image == GRAY)  # the input is not drawn on
    assert drawn.dtype == torch.uint8 and drawn.shape == image.shape


def test_each_class_has_its_own_colour():
    colors = drawing.class_colors(5)
    assert len(set(colors)) == 5 and colors == drawing.class_colors(5)  # distinct, the same on every call
    assert len(set(drawing.class_colors(80))) == 80
    boxes = np.array([[5.0, 5.0, 30.0, 60.0], [40.0, 5.0, 70.0, 60.0]])
    drawn = drawing.draw_boxes(gray_image(), boxes, np.array([0, 2]), CLASS_NAMES)
    cat, cow = drawing.class_colors(3)[0], drawing.class_colors(3)[2]
    assert cat != cow
    assert color_at(drawn, 5, 50) == cat and color_at(drawn, 40, 50) == cow


def test_no_boxes_give_an_unchanged_copy_and_unknown_labels_an_error():
    image = gray_image()
    drawn = drawing.draw_boxes(image, np.zeros((0, 4)), np.zeros(0, np.int64), CLASS_NAMES)
    assert torch.equal(drawn, image) and drawn is not image
    with pytest.raises(ValueError, match="3 class names"):
        drawing.draw_boxes(image, np.array([[1.0, 1.0, 9.0, 9.0]]), np.array([3]), CLASS_NAMES)


def test_confident_keeps_scores_at_the_threshold_and_above_least_confident_first():
    prediction = {"boxes": np.arange(16, dtype=np.float32).reshape(4, 4), "scores": np.array([0.7, 0.2, 0.5, 0.9]),
                  "labels": np.array([0, 1, 2, 0])}
    shown = drawing.confident(prediction, 0.5)
    np.testing.assert_allclose(shown["scores"], [0.5, 0.7, 0.9])  # drawn in this order: the best on top
    np.testing.assert_array_equal(shown["labels"], [2, 0, 0])
    np.testing.assert_array_equal(shown["boxes"][:, 0], [8, 0, 12])


def test_ground_truth_and_predictions_side_by_side():
    image = gray_image(height=50, width=60)
    prediction = {"boxes": np.array([[30.0, 10.0, 50.0, 40.0]]), "scores": np.array([0.8]), "labels": np.array([2])}
    annotations = np.array([[5.0, 10.0, 25.0, 40.0, 0.0]], dtype=np.float32)
    picture = drawing.render(image, prediction, CLASS_NAMES, 0.5, annotations)
    top = drawing.CAPTION_HEIGHT
    assert picture.shape == (3, top + 50, 2 * 60)  # captions above two panels of the image's size
    cat, cow = drawing.class_colors(3)[0], drawing.class_colors(3)[2]
    assert color_at(picture, 5, top + 35) == cat  # ground truth on the left
    assert color_at(picture, 60 + 5, top + 35) == (GRAY,) * 3
    assert color_at(picture, 60 + 30, top + 35) == cow  # the prediction on the right
    assert color_at(picture, 30, top + 35) == (GRAY,) * 3
    assert torch.any(picture[:, :top, :60] > 200) and torch.any(picture[:, :top, 60:] > 200)  # white captions
    assert drawing.render(image, prediction, CLASS_NAMES, 0.5).shape == (3, 50, 60)  # no annotations: one panel


def test_output_names_keep_jpeg_and_number_duplicates():
    assert drawing.output_names(["a/x.JPG", "a/y.bmp", "b/z.png"]) == ["x.JPG", "y.png", "z.png"]
    assert drawing.output_names(["a/x.png", "b/x.png"]) == ["00000_x.png", "00001_x.png"]


# ------------------------------------------------------------------------------------------------------- files


def test_folder_of_images_gives_one_drawing_per_image_at_its_size(tmp_path):
    save_gray(tmp_path / "in" / "a.jpg", 48, 64)
    save_gray(tmp_path / "in" / "b.png", 40, 50)
    save_gray(tmp_path / "in" / "c.bmp", 60, 48)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    image_paths = visualize.find_images(str(tmp_path / "in"))
    paths = drawing.visualize_images(FixedDetector().eval(), CLASS_NAMES, image_paths, str(tmp_path / "out"))
    assert paths == [str(tmp_path / "out" / name) for name in ("a.jpg", "b.png", "c.png")]
    formats_and_sizes = [(Image.open(path).format, Image.open(path).size) for path in paths]
    assert formats_and_sizes == [("JPEG", (48, 64)), ("PNG", (40, 50)), ("PNG", (60, 48))]
    drawn = np.asarray(Image.open(paths[1]))  # (H, W, 3), lossless; b.png, 40 pixels wide, is seen at scale 1
    assert tuple(drawn[20, 4]) == drawing.class_colors(3)[1]  # the dog at score 0.9
    assert tuple(drawn[40, 2]) == (GRAY,) * 3  # not the cat at 0.3, below the threshold 0.5


def test_annotated_set_gives_ground_truth_next_to_predictions_for_limit_images(tmp_path):
    for name in ("0.png", "1.png", "2.png"):
        save_gray(tmp_path / name, 40, 50)
    (tmp_path / "classes.csv").write_text("cat,0\ndog,1\ncow,2\n")
    (tmp_path / "val.csv").write_text("0.png,5,5,20,30,cow\n1.png,,,,,\n2.png,1,1,9,9,cat\n")
    dataset = CSVDataset(str(tmp_path / "val.csv"), str(tmp_path / "classes.csv"))
    paths = drawing.visualize_dataset(FixedDetector().eval(), dataset, str(tmp_path / "out"), limit=2)
    assert paths == [str(tmp_path / "out" / "0.png"), str(tmp_path / "out" / "1.png")]
    assert [Image.open(path).size for path in paths] == [(2 * 40, drawing.CAPTION_HEIGHT + 50)] * 2
    drawn = np.asarray(Image.open(paths[0]))
    assert tuple(drawn[drawing.CAPTION_HEIGHT + 25, 5]) == drawing.class_colors(3)[2]  # the annotated cow


def test_unreadable_image_is_a_value_error_naming_it(tmp_path):
    save_gray(tmp_path / "in" / "good.png", 32, 32)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    image_paths = visualize.find_images(str(tmp_path / "in"))
    with pytest.raises(ValueError, match="broken.png"):
        drawing.visualize_images(FixedDetector().eval(), CLASS_NAMES, image_paths, str(tmp_path / "out"))


def test_drawings_never_overwrite_the_input_images(tmp_path):
    image_paths = [save_gray(tmp_path / "a.png", 32, 32)]
    with pytest.raises(ValueError, match="overwrite the input"):
        drawing.visualize_images(FixedDetector().eval(), CLASS_NAMES, image_paths, str(tmp_path))
    dataset = DetectionDataset(image_paths, [np.zeros((0, 5), np.float32)], CLASS_NAMES)
    with pytest.raises(ValueError, match="overwrite the input"):
        drawing.visualize_dataset(FixedDetector().eval(), dataset, str(tmp_path))


@pytest.mark.parametrize("folder, message", [("missing", "no such image file or folder"),
                                             ("empty", "no images found")])
def test_missing_or_empty_folder_exits_with_status_2_and_no_traceback(trained_shapes_run, tmp_path, capsys, folder,
                                                                    message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    # the model is loaded first, then the images looked for
    status = visualize.main(["--images", str(tmp_path / folder), "--model", trained_shapes_run.checkpoint,
                             "--device", "cpu"])
    assert status == 2
    error = capsys.readouterr().err
    assert error.startswith("visualize.py: error: ") and message in error and str(tmp_path / folder) in error
    assert "Traceback" not in error


@pytest.mark.parametrize("argv", [
    ["--model", "x.pt"],  # nothing to draw on
    ["--model", "x.pt", "--images", "in", "--dataset", "csv", "--csv_val", "a", "--classes", "b"],
    ["--model", "x.pt", "--dataset", "csv", "--csv_val", "val.csv"],
    ["--model", "x.pt", "--dataset", "coco"],
    ["--augmented", "4", "--dataset", "voc"],  # no --voc_path
    ["--augmented", "4", "--model", "x.pt", "--images", "in"],  # training samples are drawn without a model
    ["--model", "x.pt", "--images", "in", "--limit", "0"],  # at least one image
])
def test_incomplete_or_contradictory_flags_are_refused(argv):
    with pytest.raises(SystemExit) as exit_info:
        visualize.parse_args(argv)
    assert exit_info.value.code == 2


def test_bad_threshold_and_limit_are_value_errors(tmp_path):
    image_paths = [save_gray(tmp_path / "a.png", 32, 32)]
    dataset = DetectionDataset(image_paths, [np.zeros((0, 5), np.float32)], CLASS_NAMES)
    with pytest.raises(ValueError, match="draw_threshold"):
        drawing.visualize_dataset(FixedDetector().eval(), dataset, str(tmp_path / "out"), 1.5)
    with pytest.raises(ValueError, match="draw_threshold"):
        drawing.visualize_images(FixedDetector().eval(), CLASS_NAMES, image_paths, str(tmp_path / "out"), 1.5)
    with pytest.raises(ValueError, match="limit"):
        drawing.visualize_dataset(FixedDetector().eval(), dataset, str(tmp_path / "out"), limit=0)


def test_augmented_draws_the_first_training_samples_as_the_loop_receives_them(tmp_path, capsys):
    # A LabelImg folder: two landscape images with boxes (one difficult) and a portrait one without. With batches of
    # 2 at seed 4, the first batch of train.py's sampler holds the two landscape images, each with its seed.
    save_gray(tmp_path / "voc" / "a.png", 40, 30)
    save_gray(tmp_path / "voc" / "b.png", 36, 30)
    save_gray(tmp_path / "voc" / "c.png", 30, 44)
    (tmp_path / "voc" / "a.xml").write_text(voc_xml("a.png", [("cat", (3, 4, 20, 25), 0, 0)], 40, 30))
    (tmp_path / "voc" / "b.xml").write_text(voc_xml("b.png", [("dog", (6, 6, 30, 20), 1, 0)], 36, 30))
    (tmp_path / "voc" / "c.xml").write_text(voc_xml("c.png", [], 30, 44))
    argv = ["--dataset", "voc", "--voc_path", str(tmp_path / "voc"), "--augmented", "2", "--augment", "rot90",
            "vflip", "--min_size", "30", "--max_size", "60", "--batch_size", "2", "--seed", "4", "--output_dir",
            str(tmp_path / "drawn")]
    assert visualize.main(argv) == 0
    assert "saved 2 images" in capsys.readouterr().out
    transform = build_transform(True, 30, 60, augmentation=Augmentation(["rot90", "vflip"]))
    dataset = VOCDataset([str(tmp_path / "voc")], "trainval", transform=transform)
    sampler = TrainingSampler(dataset.image_sizes, 2, seed=4)
    first_batch = next(iter(sampler))
    assert sorted(index for index, _ in first_batch) == [0, 1]
    assert sorted(path.name for path in (tmp_path / "drawn").iterdir()) == ["a.png", "b.png"]
    for index, seed in first_batch:
        item = dataset[(index, seed)]
        expected = drawing.draw_boxes(item["image"], item["annotations"][:, :4], item["annotations"][:, 4],
                                      dataset.class_names, difficult=item["difficult"])
        drawn = read_rgb_image(str(tmp_path / "drawn" / "ab"[index]) + ".png")
        assert torch.equal(drawn, expected)  # pixel for pixel, the boxes where training has them


def test_difficult_boxes_are_labelled_so():
    plain = drawing.draw_boxes(gray_image(), np.array([[10.0, 20.0, 50.0, 56.0]]), np.array([1]), CLASS_NAMES)
    marked = drawing.draw_boxes(gray_image(), np.array([[10.0, 20.0, 50.0, 56.0]]), np.array([1]), CLASS_NAMES,
                                difficult=np.array([True]))
    assert torch.equal(plain[:, 40:], marked[:, 40:])  # the same outline
    assert (marked[:, 20:32, 10:50] != plain[:, 20:32, 10:50]).any()  # a longer label: "dog difficult"
