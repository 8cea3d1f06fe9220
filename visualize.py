"""Draw a RetinaNet's detections on images: each predicted box in its class's colour with the class name and score,
on the original image; on an annotated set, the ground truth next to the predictions.

    python visualize.py --model output/best.pt --images photos/ --output drawn/
    python visualize.py --model output/best.pt --dataset csv --csv_annotations val.csv --csv_classes classes.csv
    python visualize.py --model output/best.pt --dataset coco --coco_path /data/coco --set_name val2017 --limit 20

Only detections with score >= --score_threshold (0.5 by default) are drawn: the paper's §4.1 inference keeps
everything above 0.05 for the AP computation, far too many boxes to look at. JPEG images are saved as JPEG,
everything else as PNG. No display is needed unless --show asks for matplotlib windows.

Before training, --anchors draws what the anchors cover (§4 "Anchors"): each ground-truth box with its best anchor,
green where their IoU is >= 0.5, red where not, on the images resized as for training. The anchors and image size
are the model's with --model, otherwise the paper's (800 / 1333 pixels); the train.py flags --min_size, --max_size,
--anchor_sizes, --anchor_scales and --anchor_ratios change them:

    python visualize.py --anchors --dataset csv --csv_annotations train.csv --csv_classes classes.csv --min_size 600
"""

import argparse
import os
import sys

from retinanet.checkpoint import checkpoint_settings, read_checkpoint
from retinanet.cli import add_anchor_arguments, add_inference_arguments, run_script, typed_settings
from retinanet.dataloader import CocoDataset, CSVDataset, DetectionDataset
from retinanet.drawing import image_folder_dataset, show_images, visualize_anchors, visualize_dataset
from retinanet.images import find_images
from retinanet.predict import load_for_inference
from retinanet.settings import ModelSettings

ANCHOR_FLAGS = ("min_size", "max_size", "anchor_sizes", "anchor_scales", "anchor_ratios")  # model settings, by name


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
    parser.add_argument("--anchors", action="store_true", help="draw each ground-truth box with its best anchor instead (green: IoU >= 0.5, red: below), at the training image size; needs --dataset; with --model, its anchors and image size")
    add_anchor_arguments(parser)
    add_inference_arguments(parser, model_required=False)
    args = parser.parse_args(argv)
    if (args.images is None) == (args.dataset is None):
        parser.error("give either --images PATH_OR_FOLDER or --dataset csv|coco")
    if args.anchors and args.dataset is None:
        parser.error("--anchors draws the ground truth: give --dataset csv|coco")
    if args.model is None and not args.anchors:
        parser.error("the following arguments are required: --model")
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


def anchor_settings(args: argparse.Namespace, num_classes: int) -> ModelSettings:
    """The anchors and image size to draw with: the model's (--model) or the paper's, and the flags typed."""
    settings = checkpoint_settings(read_checkpoint(args.model)) if args.model else ModelSettings(num_classes)
    return settings.replace(**typed_settings(args, ANCHOR_FLAGS))


def draw_anchors(args: argparse.Namespace, dataset: DetectionDataset) -> None:
    """Draw each ground-truth box of the dataset with its best anchor, save, and say where the drawings went."""
    settings = anchor_settings(args, max(1, dataset.num_classes))
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    print(f"drawing the best anchor of each box on {count} images of {args.csv_annotations or args.set_name}, "
          f"resized to a shorter side of {settings.min_size} (longer side at most {settings.max_size}), with "
          f"{settings.num_anchors} anchors per location")
    paths = visualize_anchors(dataset, settings, args.output, args.limit)
    print(f"saved {len(paths)} images to {os.path.abspath(args.output)}")
    if args.show:
        show_images(paths)


def run(args: argparse.Namespace) -> None:
    """Load the images and the model, draw, save, and say where the drawings went."""
    dataset = build_dataset(args)
    if args.anchors:
        return draw_anchors(args, dataset)
    model, _, device = load_for_inference(args.model, dataset, args.device, args.min_size, args.max_size)
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
