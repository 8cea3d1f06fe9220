"""Drawing a detector's output (boxes, class labels and scores) on images: each box in its class's colour with the
class name and score, on the original image; on an annotated set, the ground truth next to the predictions. Drawing
what training sees: the images and boxes of the training loop's batches, after their random transforms and
augmentations. And, before training, what the anchors
cover (§4 "Anchors"): each ground-truth box with its best anchor, green where their IoU reaches the foreground
threshold, red where not.

Legend for shapes: N boxes of one image, (3, H, W) an RGB image, h the height of a caption band.
"""

import colorsys
import os

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from ..anchors import Anchors
from ..dataloader import DetectionDataset, ImageFiles, Transform, build_transform, read_rgb_image, training_loader
from ..diagnostics.coverage import best_anchors
from ..evaluation import predict_dataset
from ..inference import cap_report
from ..settings import ModelSettings

JPEG_EXTENSIONS = (".jpg", ".jpeg")  # saved as JPEG again; every other format as PNG
JPEG_QUALITY = 95
PIXELS_PER_LINE_WIDTH = 400  # box outlines 1 pixel wide per 400 pixels of the longer image side, at least 2
MIN_LINE_WIDTH = 2
CAPTION_HEIGHT = 16  # the band above each panel of a side-by-side picture; fits Pillow's default 10-point font
CAPTION_MARGIN = 4
COVERED_COLOUR = (0, 200, 0)  # a best anchor of IoU >= fg_iou: the box is a foreground target (§4 "Anchors")
UNCOVERED_COLOUR = (255, 0, 0)  # a best anchor below fg_iou
GROUND_TRUTH_COLOUR = (255, 255, 255)
DRAW_THRESHOLD = 0.5  # the detections drawn: the 0.05 of §4.1's inference is far too many boxes to look at


# ---------------------------------------------------------------------------------------------------- drawing


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
    """One RGB colour per class, hues evenly spaced around the colour wheel: the same colours on every run."""
    hsv = [(k / num_classes, 0.75, 1.0) for k in range(num_classes)]
    return [tuple(round(255 * channel) for channel in colorsys.hsv_to_rgb(*color)) for color in hsv]


def draw_boxes(
    image: torch.Tensor,
    boxes: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    class_names: list[str],
    scores: np.ndarray | torch.Tensor | None = None,
    difficult: np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw boxes (N, 4) x1, y1, x2, y2 in the pixels of `image` (3, H, W) uint8, each outlined in the colour of
    its class (class_colors) and labelled with the class name, and the score when `scores` (N,) is given, and
    "difficult" for the boxes `difficult` (N,) bool marks. Returns a new (3, H, W) uint8 image; `image` is left as
    it is."""
    labels = [int(label) for label in labels]
    if any(not 0 <= label < len(class_names) for label in labels):
        raise ValueError(f"labels {sorted(set(labels))} do not all index the {len(class_names)} class names")
    if not labels:
        return image.clone()
    colors = class_colors(len(class_names))
    texts = [class_names[label] for label in labels]
    if scores is not None:
        texts = [f"{text} {float(score):.2f}" for text, score in zip(texts, scores)]
    if difficult is not None:
        texts = [f"{text} difficult" if is_difficult else text for text, is_difficult in zip(texts, difficult)]
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)  # (N, 4)
    return draw_bounding_boxes(image, boxes, texts, colors=[colors[label] for label in labels],
                               width=line_width(image), fill_labels=True)  # black text on the class colour


def line_width(image: torch.Tensor) -> int:
    """The width of box outlines on a (3, H, W) image: 1 pixel per PIXELS_PER_LINE_WIDTH, at least MIN_LINE_WIDTH."""
    return max(MIN_LINE_WIDTH, round(max(image.shape[1:]) / PIXELS_PER_LINE_WIDTH))


def draw_anchor_coverage(image: torch.Tensor, boxes: torch.Tensor, anchors: torch.Tensor, ious: torch.Tensor,
                         fg_iou: float) -> torch.Tensor:
    """`image` (3, H, W) uint8 with each of the (N, 4) ground-truth boxes outlined in white and its best anchor
    (N, 4) over it, green where their IoU (N,) is >= fg_iou, red where not, under a caption that counts them:
    (3, CAPTION_HEIGHT + H, W)."""
    covered = ious >= fg_iou  # (N,)
    caption = (f"{int(covered.sum())} of {len(boxes)} boxes have an anchor of IoU >= {fg_iou:g} (green); "
               f"red: the best is below")
    if len(boxes) == 0:
        return with_caption(image, caption)
    drawn = draw_bounding_boxes(image, boxes, colors=GROUND_TRUTH_COLOUR, width=1)
    colours = [COVERED_COLOUR if box_covered else UNCOVERED_COLOUR for box_covered in covered.tolist()]
    return with_caption(draw_bounding_boxes(drawn, anchors, colors=colours, width=line_width(image)), caption)


def confident(prediction: dict[str, np.ndarray], draw_threshold: float) -> dict[str, np.ndarray]:
    """The detections with score >= draw_threshold, by increasing score: the most confident are drawn last, on top."""
    kept = np.flatnonzero(prediction["scores"] >= draw_threshold)
    order = kept[np.argsort(prediction["scores"][kept], kind="stable")]
    return {key: prediction[key][order] for key in ("boxes", "scores", "labels")}


def with_caption(image: torch.Tensor, text: str) -> torch.Tensor:
    """`image` (3, H, W) under a black band with `text` in white: (3, CAPTION_HEIGHT + H, W)."""
    band = Image.new("RGB", (image.shape[2], CAPTION_HEIGHT))
    ImageDraw.Draw(band).text((CAPTION_MARGIN, 0), text, fill="white")
    band = torch.from_numpy(np.array(band)).permute(2, 0, 1)  # (h, W, 3) -> (3, h, W)
    return torch.cat([band, image], dim=1)  # (3, h, W) + (3, H, W) -> (3, h + H, W)


def render(
    image: torch.Tensor,
    prediction: dict[str, np.ndarray],
    class_names: list[str],
    draw_threshold: float = DRAW_THRESHOLD,
    annotations: np.ndarray | None = None,
) -> torch.Tensor:
    """`image` (3, H, W) uint8 with the predictions of score >= draw_threshold drawn on it: (3, H, W). With
    annotations (N, 5) x1, y1, x2, y2, class, two captioned panels, ground truth | predictions:
    (3, CAPTION_HEIGHT + H, 2W)."""
    shown = confident(prediction, draw_threshold)
    predicted = draw_boxes(image, shown["boxes"], shown["labels"], class_names, shown["scores"])
    if annotations is None:
        return predicted
    ground_truth = draw_boxes(image, annotations[:, :4], annotations[:, 4], class_names)
    panels = [with_caption(ground_truth, "ground truth"), with_caption(predicted, "predictions")]
    return torch.cat(panels, dim=2)  # 2 x (3, h + H, W) -> (3, h + H, 2W)


# ------------------------------------------------------------------------------------------------------ files


def output_names(image_paths: list[str]) -> list[str]:
    """The file name of each drawn image: the image's own name, as .png unless it is a JPEG, and prefixed with its
    position when two images share a name (as two CSV rows may, from different folders)."""
    names = []
    for path in image_paths:
        stem, extension = os.path.splitext(os.path.basename(path))
        names.append(stem + (extension if extension.lower() in JPEG_EXTENSIONS else ".png"))
    if len(set(names)) < len(names):
        names = [f"{position:05d}_{name}" for position, name in enumerate(names)]
    return names


def save_image(image: torch.Tensor, path: str, source_path: str) -> str:
    """Write (3, H, W) uint8 `image` to `path`, as JPEG or PNG by its extension, never over `source_path`."""
    if os.path.exists(path) and os.path.samefile(path, source_path):
        raise ValueError(f"{path}: refusing to overwrite the input image; write the drawings to another folder")
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)
    if path.lower().endswith(JPEG_EXTENSIONS):
        picture.save(path, quality=JPEG_QUALITY)
    else:
        picture.save(path)
    return path


def first_images(dataset: DetectionDataset, limit: int | None, transform: Transform | None) -> DetectionDataset:
    """The first `limit` images of `dataset` (all if None) with their annotations, as a dataset of their own whose
    items go through `transform`."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or None for all images), got {limit}")
    if len(dataset) == 0:
        raise ValueError("no images to draw on: the dataset is empty")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    return DetectionDataset(dataset.image_paths[:count], [dataset.load_annotations(index) for index in range(count)],
                            dataset.class_names, transform, image_sizes=dataset.image_sizes[:count])


def visualize_dataset(
    model: nn.Module,
    dataset: DetectionDataset,
    output_dir: str,
    draw_threshold: float = DRAW_THRESHOLD,
    limit: int | None = 8,
    batch_size: int = 8,
    workers: int = 0,
) -> list[str]:
    """Detect with `model` (in eval mode) on the first `limit` images of `dataset` (all if None) and save each
    image into output_dir with its detections of score >= draw_threshold drawn on it; if any image of the dataset
    is annotated, the ground truth next to them (see render), each box named by dataset.class_names. Returns the
    paths written, in dataset order."""
    if not 0.0 <= draw_threshold <= 1.0:
        raise ValueError(f"draw_threshold must be in [0, 1], got {draw_threshold}")
    subset = first_images(dataset, limit, dataset.transform)
    image_paths, annotations = subset.image_paths, subset.annotations
    has_ground_truth = any(len(dataset.load_annotations(index)) for index in range(len(dataset)))
    predictions = predict_dataset(model, subset, batch_size=batch_size, workers=workers)
    print(cap_report(predictions, model.settings.max_detections))
    return draw_predictions(image_paths, predictions, dataset.class_names, output_dir, draw_threshold,
                            annotations if has_ground_truth else None)


def visualize_images(
    model: nn.Module,
    class_names: list[str],
    image_paths: list[str],
    output_dir: str,
    draw_threshold: float = DRAW_THRESHOLD,
    batch_size: int = 8,
    workers: int = 0,
) -> list[str]:
    """Detect with `model` (in eval mode) on image files, each seen whole as the model's resize rule gives it, and
    save each into output_dir with its detections of score >= draw_threshold drawn on it. Returns the paths
    written, in order; an image that cannot be read is a ValueError naming it."""
    if not 0.0 <= draw_threshold <= 1.0:
        raise ValueError(f"draw_threshold must be in [0, 1], got {draw_threshold}")
    images = ImageFiles(image_paths, model.settings.min_size, model.settings.max_size)
    predictions = predict_dataset(model, images, batch_size=batch_size, workers=workers)
    unread = [images.why_unread(path) for path in image_paths if path not in images.image_paths]
    unread += [images.why_unread(path) for path, prediction in zip(images.image_paths, predictions) if prediction is None]
    if unread:
        raise ValueError(unread[0])
    print(cap_report(predictions, model.settings.max_detections))
    return draw_predictions(image_paths, predictions, class_names, output_dir, draw_threshold)


def draw_predictions(
    image_paths: list[str],
    predictions: list[dict[str, np.ndarray]],
    class_names: list[str],
    output_dir: str,
    draw_threshold: float = DRAW_THRESHOLD,
    annotations: list[np.ndarray] | None = None,
) -> list[str]:
    """Save each image into output_dir (named by output_names) with its predictions (boxes in its pixels) of score
    >= draw_threshold drawn on it, next to its (N, 5) annotations where given (see render). Returns the paths
    written, in order."""
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for index, name in enumerate(tqdm(output_names(image_paths), desc="drawing", unit="image")):
        picture = render(read_rgb_image(image_paths[index]), predictions[index], class_names, draw_threshold,
                         annotations[index] if annotations is not None else None)
        paths.append(save_image(picture, os.path.join(output_dir, name), image_paths[index]))
    return paths


def draw_training_samples(
    dataset: DetectionDataset, count: int, output_dir: str, batch_size: int = 8, seed: int = 0, workers: int = 0
) -> list[str]:
    """Save the first `count` samples of a training run with `seed` and `batch_size` (on one process) as its loop
    receives them: the batches of the first epoch of train.py's sampler, each image after the random transforms of
    `dataset.transform` seeded as in training, without its batch's padding, with its boxes (and difficult flags).
    Returns the paths written, in training order."""
    if count < 1:
        raise ValueError(f"the number of samples to draw must be at least 1, got {count}")
    _, loader = training_loader(dataset, batch_size, workers, seed)
    indices, pictures = [], []
    with tqdm(total=min(count, len(dataset)), desc="augmenting", unit="image") as progress:
        for batch in loader:
            for i, index in enumerate(batch["indices"][: count - len(pictures)]):
                height, width = batch["image_sizes"][i].tolist()
                rows = batch["annotations"][i, :, 4] >= 0  # (Nmax,): not the rows of -1 that pad the batch
                boxes, labels = batch["annotations"][i, rows, :4], batch["annotations"][i, rows, 4]
                image = batch["images"][i, :, :height, :width]  # (3, Hp, Wp) -> (3, H, W)
                pictures.append(draw_boxes(image, boxes, labels, dataset.class_names,
                                           difficult=batch["difficult"][i, rows]))
                indices.append(index)
                progress.update()
            if len(pictures) == count:
                break
    os.makedirs(output_dir, exist_ok=True)
    image_paths = [dataset.image_paths[index] for index in indices]
    return [save_image(picture, os.path.join(output_dir, name), path)
            for picture, name, path in zip(pictures, output_names(image_paths), image_paths)]


def visualize_anchors(dataset: DetectionDataset, settings: ModelSettings, output_dir: str,
                      limit: int | None = 8) -> list[str]:
    """Save the first `limit` images of `dataset` (all if None) into output_dir, resized as the settings' model
    trains (min_size, max_size), with each ground-truth box and its best anchor of the settings drawn on it
    (draw_anchor_coverage). Returns the paths written, in dataset order."""
    subset = first_images(dataset, limit, build_transform(False, settings.min_size, settings.max_size))
    anchors = Anchors(settings)
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for index, name in enumerate(tqdm(output_names(subset.image_paths), desc="drawing", unit="image")):
        item = subset[index]
        boxes = item["annotations"][:, :4]  # (N, 4) in the resized image's pixels
        image_sizes = torch.tensor(item["image"].shape[1:]).expand(len(boxes), 2)  # (N, 2)
        ious, best = best_anchors(boxes, image_sizes, anchors)
        picture = draw_anchor_coverage(item["image"], boxes, best, ious, settings.fg_iou)
        paths.append(save_image(picture, os.path.join(output_dir, name), subset.image_paths[index]))
    return paths


def show_images(paths: list[str]) -> None:
    """Open each image in a matplotlib window (needs a display); returns when all windows are closed."""
    import matplotlib.pyplot as plt  # only here: drawing and saving touch no GUI backend

    for path in paths:
        axes = plt.figure(os.path.basename(path)).add_subplot()
        axes.imshow(read_rgb_image(path).permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)
        axes.set_axis_off()
    plt.show()
