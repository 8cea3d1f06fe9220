"""Draw a RetinaNet's detections on images: each predicted box in its class's colour with the class name and score,
on the original image; on an annotated set, the ground truth next to the predictions.

    python visualize.py --model output/best.pt --images photos/ --output drawn/
    python visualize.py --model output/best.pt --dataset csv --csv_annotations val.csv --csv_classes classes.csv
    python visualize.py --model output/best.pt --dataset coco --coco_path /data/coco --set_name val2017 --limit 20

Only detections with score >= --score_threshold (0.5 by default) are drawn: the paper's §4 inference keeps
everything above 0.05 for the AP computation, far too many boxes to look at. JPEG images are saved as JPEG,
everything else as PNG. No display is needed unless --show asks for matplotlib windows.
"""

import argparse
import colorsys
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from retinanet.cli import add_inference_arguments, run_script
from retinanet.dataloader import CocoDataset, CSVDataset, DetectionDataset, Transform, read_rgb_image
from retinanet.predict import check_class_names, load_for_inference, predict_dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # what a folder scan picks
JPEG_EXTENSIONS = (".jpg", ".jpeg")  # saved as JPEG again; every other format as PNG
JPEG_QUALITY = 95
PIXELS_PER_LINE_WIDTH = 400  # box outlines 1 pixel wide per 400 pixels of the longer image side, at least 2
MIN_LINE_WIDTH = 2
CAPTION_HEIGHT = 16  # the band above each panel of a side-by-side picture; fits Pillow's default 10-point font
CAPTION_MARGIN = 4


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
) -> torch.Tensor:
    """Draw boxes (N, 4) x1, y1, x2, y2 in the pixels of `image` (3, H, W) uint8, each outlined in the colour of
    its class (class_colors) and labelled with the class name, and the score when `scores` (N,) is given.
    Returns a new (3, H, W) uint8 image; `image` is left as it is."""
    labels = [int(label) for label in labels]
    if any(not 0 <= label < len(class_names) for label in labels):
        raise ValueError(f"labels {sorted(set(labels))} do not all index the {len(class_names)} class names")
    if not labels:
        return image.clone()
    colors = class_colors(len(class_names))
    texts = [class_names[label] for label in labels]
    if scores is not None:
        texts = [f"{text} {float(score):.2f}" for text, score in zip(texts, scores)]
    height, width = image.shape[1:]
    line_width = max(MIN_LINE_WIDTH, round(max(height, width) / PIXELS_PER_LINE_WIDTH))
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)  # (N, 4)
    return draw_bounding_boxes(image, boxes, texts, colors=[colors[label] for label in labels], width=line_width,
                               fill_labels=True)  # black text on the class colour


def confident(prediction: dict[str, np.ndarray], score_threshold: float) -> dict[str, np.ndarray]:
    """The detections with score >= score_threshold, by increasing score: the most confident are drawn last, on top."""
    kept = np.flatnonzero(prediction["scores"] >= score_threshold)
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
    score_threshold: float = 0.5,
    annotations: np.ndarray | None = None,
) -> torch.Tensor:
    """`image` (3, H, W) uint8 with the predictions of score >= score_threshold drawn on it: (3, H, W). With
    annotations (N, 5) x1, y1, x2, y2, class, two captioned panels, ground truth | predictions:
    (3, CAPTION_HEIGHT + H, 2W)."""
    shown = confident(prediction, score_threshold)
    predicted = draw_boxes(image, shown["boxes"], shown["labels"], class_names, shown["scores"])
    if annotations is None:
        return predicted
    ground_truth = draw_boxes(image, annotations[:, :4], annotations[:, 4], class_names)
    panels = [with_caption(ground_truth, "ground truth"), with_caption(predicted, "predictions")]
    return torch.cat(panels, dim=2)  # 2 x (3, h + H, W) -> (3, h + H, 2W)


# ------------------------------------------------------------------------------------------------------ files


def find_images(path: str) -> list[str]:
    """[path] for an image file; the image files (IMAGE_EXTENSIONS) directly in a folder, sorted by name."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such image file or folder")
    names = sorted(name for name in os.listdir(path) if name.lower().endswith(IMAGE_EXTENSIONS))
    image_paths = [os.path.join(path, name) for name in names if os.path.isfile(os.path.join(path, name))]
    if not image_paths:
        raise ValueError(f"{path}: no images found in this folder (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return image_paths


def image_folder_dataset(
    image_paths: list[str], class_names: list[str], transform: Transform | None = None
) -> DetectionDataset:
    """A DetectionDataset of plain images, without annotations, for predict_dataset."""
    no_boxes = [np.zeros((0, 5), np.float32)] * len(image_paths)
    return DetectionDataset(image_paths, no_boxes, class_names, transform)


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


def visualize_dataset(
    model: nn.Module,
    dataset: DetectionDataset,
    class_names: list[str],
    output_dir: str,
    score_threshold: float = 0.5,
    limit: int | None = 8,
    batch_size: int = 8,
    workers: int = 0,
) -> list[str]:
    """Detect with `model` (in eval mode) on the first `limit` images of `dataset` (all if None) and save each
    image into output_dir with its detections of score >= score_threshold drawn on it; if any image of the dataset
    is annotated, the ground truth next to them (see render). Returns the paths written, in dataset order."""
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or None for all images), got {limit}")
    if len(dataset) == 0:
        raise ValueError("no images to draw on: the dataset is empty")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    image_paths = [dataset.image_path(index) for index in range(count)]
    annotations = [dataset.load_annotations(index) for index in range(count)]
    has_ground_truth = any(len(dataset.load_annotations(index)) for index in range(len(dataset)))
    subset = DetectionDataset(image_paths, annotations, dataset.class_names, dataset.transform)
    predictions = predict_dataset(model, subset, batch_size=batch_size, workers=workers)
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for index, name in enumerate(tqdm(output_names(image_paths), desc="drawing", unit="image")):
        picture = render(read_rgb_image(image_paths[index]), predictions[index], class_names, score_threshold,
                         annotations[index] if has_ground_truth else None)
        paths.append(save_image(picture, os.path.join(output_dir, name), image_paths[index]))
    return paths


def show_images(paths: list[str]) -> None:
    """Open each image in a matplotlib window (needs a display); returns when all windows are closed."""
    import matplotlib.pyplot as plt  # only here: without --show no GUI backend is touched

    for path in paths:
        axes = plt.figure(os.path.basename(path)).add_subplot()
        axes.imshow(read_rgb_image(path).permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)
        axes.set_axis_off()
    plt.show()


# ----------------------------------------------------------------------------------------------------- script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The script's flags; exactly one of --images and --dataset, with the files that dataset needs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", metavar="PATH_OR_FOLDER", help="an image file, or a folder of images, to detect on")
    parser.add_argument("--dataset", choices=("csv", "coco"), help="detect on an annotated set instead, and draw its ground truth next to the predictions")
    parser.add_argument("--csv_annotations", metavar="CSV", help="with --dataset csv: annotations path,x1,y1,x2,y2,class_name")
    parser.add_argument("--csv_classes", metavar="CSV", help="with --dataset csv: class list class_name,id (as used for training)")
    parser.add_argument("--coco_path", metavar="PATH", help="with --dataset coco: root holding annotations/instances_{set}.json")
    parser.add_argument("--set_name", default="val2017", help="with --dataset coco: which set (default val2017)")
    parser.add_argument("--output", default="visualizations", metavar="DIR", help="where the drawn images are saved (default: visualizations)")
    parser.add_argument("--score_threshold", type=float, default=0.5, help="draw detections with at least this score (default 0.5)")
    parser.add_argument("--limit", type=int, metavar="N", help="draw only the first N images (default: all)")
    parser.add_argument("--show", action="store_true", help="also open the drawn images in matplotlib windows (needs a display)")
    add_inference_arguments(parser)
    args = parser.parse_args(argv)
    if (args.images is None) == (args.dataset is None):
        parser.error("give either --images PATH_OR_FOLDER or --dataset csv|coco")
    if args.dataset == "csv" and not (args.csv_annotations and args.csv_classes):
        parser.error("--dataset csv needs --csv_annotations and --csv_classes")
    if args.dataset == "coco" and not args.coco_path:
        parser.error("--dataset coco needs --coco_path")
    return args


def build_dataset(args: argparse.Namespace) -> DetectionDataset:
    """The images to draw on, checked before the model is loaded; plain images get the model's classes later."""
    if args.dataset == "csv":
        return CSVDataset(args.csv_annotations, args.csv_classes)
    if args.dataset == "coco":
        return CocoDataset(args.coco_path, args.set_name)
    return image_folder_dataset(find_images(args.images), class_names=[])


def run(args: argparse.Namespace) -> None:
    """Load the images and the model, draw, save, and say where the drawings went."""
    dataset = build_dataset(args)
    model, class_names, device, dataset.transform = load_for_inference(
        args.model, args.device, args.min_size, args.max_size)
    if args.dataset is None:
        dataset.class_names = class_names
    else:
        check_class_names(class_names, dataset.class_names)
    source = args.images or args.csv_annotations or f"COCO {args.set_name}"
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    print(f"drawing the detections of {args.model} with score >= {args.score_threshold:g} on {count} images of "
          f"{source} on {device}")
    paths = visualize_dataset(model, dataset, dataset.class_names, args.output, score_threshold=args.score_threshold,
                              limit=args.limit, batch_size=args.batch_size, workers=args.workers)
    print(f"saved {len(paths)} images to {os.path.abspath(args.output)}")
    if args.show:
        show_images(paths)


def main(argv: list[str] | None = None) -> int:
    return run_script(run, parse_args(argv), "visualize.py")


if __name__ == "__main__":
    sys.exit(main())
