"""Draw a RetinaNet's detections on images: each predicted box in its class's colour with the class name and score,
on the original image; on an annotated set, the ground truth next to the predictions. Or, without a model, draw
what training sees: --augmented N draws the first N training samples as train.py's loop receives them, after
resizing, flips and --augment, with their boxes.

    python visualize.py --model output/best.pt --images photos/ --output_dir drawn/
    python visualize.py --model output/best.pt --dataset csv --csv_val val.csv --classes classes.csv
    python visualize.py --model output/best.pt --dataset coco --coco_path /data/coco --val_set val2017 --limit 20
    python visualize.py --model output/best.pt --dataset voc --voc_path VOCdevkit/VOC2007 --val_set test
    python visualize.py --dataset voc --voc_path VOCdevkit/VOC2007 --augmented 16 --augment crop photometric

Only detections with score >= --draw_threshold (0.5 by default) are drawn: the paper's §4.1 inference keeps
everything above 0.05 for the AP computation, far too many boxes to look at. Detections are drawn on the validation
data (--csv_val, --val_set); --augmented and --anchors draw the training data (--csv_train, --train_set). JPEG images are saved as JPEG,
everything else as PNG. No display is needed unless --show asks for matplotlib windows.

Before training, --anchors draws what the anchors cover (§4 "Anchors"): each ground-truth box with its best anchor,
green where their IoU is >= 0.5, red where not, on the images resized as for training. The anchors and image size
are the model's with --model, otherwise the paper's (800 / 1333 pixels); the train.py flags --min_size, --max_size,
--anchor_sizes, --anchor_scales and --anchor_ratios change them:

    python visualize.py --anchors --dataset csv --csv_train train.csv --classes classes.csv --min_size 600
"""
import argparse
import os
import sys

from retinanet.checkpoint import checkpoint_settings, load_model, read_checkpoint
from retinanet.data.augmentations import AUGMENTATIONS, Augmentation
from retinanet.data.coco import CocoDataset
from retinanet.data.voc import VOCDataset
from retinanet.dataloader import CSVDataset, DetectionDataset, Transform, build_transform, find_images, read_class_list
from retinanet.evaluation import check_class_names
from retinanet.extras.drawing import (DRAW_THRESHOLD, draw_training_samples, show_images, visualize_anchors,
                                      visualize_dataset, visualize_images)
from retinanet.settings import (ANCHOR_SETTINGS, INFERENCE_SETTINGS, ModelSettings, add_inference_flags,
                                add_setting_flags, resolve_device, run_script, typed_settings)

# The sets drawn when --train_set or --val_set is not given: detections on the validation set, --augmented and
# --anchors on the training set.
DEFAULT_SETS = {"coco": ("train2017", "val2017"), "voc": ("trainval", "test")}
DATASET_FLAGS = {"csv": ("classes",), "coco": ("coco_path",), "voc": ("voc_path",)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The script's flags; exactly one of --images and --dataset, with the files that dataset needs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", metavar="PATH_OR_FOLDER", help="an image file, or a folder of images, to detect on")
    parser.add_argument("--dataset", choices=("csv", "coco", "voc"), help="detect on an annotated set instead, and draw its ground truth next to the predictions")
    parser.add_argument("--csv_val", metavar="CSV", help="with --dataset csv: the annotations to detect on, path,x1,y1,x2,y2,class_name")
    parser.add_argument("--csv_train", metavar="CSV", help="with --dataset csv and --augmented or --anchors: the training annotations")
    parser.add_argument("--classes", metavar="CSV", help="with --dataset csv: the class list class_name,id (as used for training); with voc, optional (default: the model's classes, or those found)")
    parser.add_argument("--drop_degenerate_boxes", action="store_true", help="leave out CSV boxes without area (x2 <= x1 or y2 <= y1), counted and named, instead of stopping")
    parser.add_argument("--coco_path", metavar="ROOT", help="with --dataset coco: root holding annotations/instances_{set}.json")
    parser.add_argument("--voc_path", nargs="+", metavar="ROOT", help="with --dataset voc: VOC roots or folders of XML files next to their images")
    parser.add_argument("--val_set", help="with --dataset coco or voc: the set to detect on (default val2017 or test)")
    parser.add_argument("--train_set", help="with --dataset coco or voc, --augmented or --anchors: the training set (default train2017 or trainval)")
    parser.add_argument("--augmented", type=int, metavar="N", help="draw the first N training samples of a run (no model needed) after train.py's transforms: --min_size, --max_size, --jitter, --augment, with --seed and --batch_size as in training")
    parser.add_argument("--augment", nargs="+", choices=AUGMENTATIONS, default=[], metavar="NAME", help=f"with --augmented: train.py's augmentations ({', '.join(AUGMENTATIONS)})")
    parser.add_argument("--jitter", type=int, nargs=2, metavar=("MIN", "MAX"), help="with --augmented: train.py's scale jitter")
    parser.add_argument("--seed", type=int, default=0, help="with --augmented: train.py's random seed (default 0)")
    parser.add_argument("--output_dir", default="visualizations", metavar="DIR", help="where the drawn images are saved (default: visualizations)")
    parser.add_argument("--draw_threshold", type=float, default=DRAW_THRESHOLD, help=f"draw detections with at least this score (default {DRAW_THRESHOLD})")
    parser.add_argument("--limit", type=int, metavar="N", help="draw only the first N images (default: all)")
    parser.add_argument("--show", action="store_true", help="also open the drawn images in matplotlib windows (needs a display)")
    parser.add_argument("--anchors", action="store_true", help="draw each training box with its best anchor instead (green: IoU >= 0.5, red: below), at the training image size; needs --dataset; with --model, its anchors and image size")
    add_setting_flags(parser.add_argument_group("with --anchors: the anchors (default: the model's, or the paper's)"), ANCHOR_SETTINGS)
    add_inference_flags(parser, model_required=False)
    args = parser.parse_args(argv)
    if (args.images is None) == (args.dataset is None):
        parser.error("give either --images PATH_OR_FOLDER or --dataset csv|coco|voc")
    if args.augmented is not None and (args.model is not None or args.anchors):
        parser.error("--augmented draws training samples, without a model and without --anchors")
    if args.model is None and args.augmented is None and not args.anchors:
        parser.error("give --model CHECKPOINT to draw its detections, --augmented N to draw training samples or "
                     "--anchors to draw what the anchors cover")
    if (args.anchors or args.augmented is not None) and args.dataset is None:
        parser.error("--anchors and --augmented draw a dataset's boxes: give --dataset csv|coco|voc")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    training = args.anchors or args.augmented is not None
    needed = DATASET_FLAGS.get(args.dataset, ()) + (("csv_train" if training else "csv_val",) if args.dataset == "csv" else ())
    if not all(getattr(args, flag) for flag in needed):
        parser.error(f"--dataset {args.dataset} needs " + " and ".join(f"--{flag}" for flag in needed))
    return args


def build_dataset(args: argparse.Namespace, class_names: list[str] | None,
                  transform: Transform | None = None) -> DetectionDataset:
    """The annotated set to draw on: the training set with --augmented or --anchors, else the validation set; a VOC
    set takes `class_names` (the model's, or None: those it finds) unless --classes says otherwise."""
    training = args.anchors or args.augmented is not None
    if args.dataset == "csv":
        return CSVDataset(args.csv_train if training else args.csv_val, args.classes, transform,
                          args.drop_degenerate_boxes)
    set_name = (args.train_set if training else args.val_set) or DEFAULT_SETS[args.dataset][not training]
    if args.dataset == "coco":
        return CocoDataset(args.coco_path, set_name, transform)
    voc_classes = read_class_list(args.classes) if args.classes else class_names
    return VOCDataset(args.voc_path, set_name, voc_classes, transform)


def source_of(args: argparse.Namespace, dataset: DetectionDataset) -> str:
    """The data drawn, in words."""
    return f"{len(dataset)} images of " + (args.csv_val or args.csv_train or f"{args.dataset.upper()} data")


def draw_detections(args: argparse.Namespace) -> list[str]:
    """Load the model and draw its detections on the images or the dataset; returns the paths written."""
    device = resolve_device(args.device)
    model, class_names = load_model(args.model, device, **typed_settings(vars(args), INFERENCE_SETTINGS))
    options = dict(draw_threshold=args.draw_threshold, batch_size=args.batch_size, workers=args.workers)
    if args.images is not None:
        image_paths = find_images(args.images)[: args.limit]
        print(f"drawing the detections of {args.model} with score >= {args.draw_threshold:g} on "
              f"{len(image_paths)} images of {args.images} on {device}")
        return visualize_images(model, class_names, image_paths, args.output_dir, **options)
    dataset = build_dataset(args, class_names, build_transform(False, model.settings.min_size,
                                                               model.settings.max_size))
    check_class_names(class_names, dataset.class_names)
    print(f"drawing the detections of {args.model} with score >= {args.draw_threshold:g} on "
          f"{source_of(args, dataset)} on {device}")
    return visualize_dataset(model, dataset, args.output_dir, limit=args.limit, **options)


def anchor_settings(args: argparse.Namespace, num_classes: int) -> ModelSettings:
    """The anchors and image size to draw with: the model's (with --model) or the paper's, and the flags typed."""
    settings = checkpoint_settings(read_checkpoint(args.model)) if args.model else ModelSettings(num_classes)
    return settings.replace(**typed_settings(vars(args), ("min_size", "max_size", *ANCHOR_SETTINGS)))


def draw_anchors(args: argparse.Namespace) -> list[str]:
    """Draw each ground-truth box of the dataset with its best anchor; returns the paths written."""
    dataset = build_dataset(args, None)
    settings = anchor_settings(args, max(1, dataset.num_classes))
    print(f"drawing the best anchor of each box on {source_of(args, dataset)}, resized to a shorter side of "
          f"{settings.min_size} (longer side at most {settings.max_size}), with {settings.num_anchors} anchors per "
          f"location")
    return visualize_anchors(dataset, settings, args.output_dir, args.limit)


def draw_augmented(args: argparse.Namespace) -> list[str]:
    """Draw the first --augmented training samples of the dataset as train.py's loop receives them; returns the
    paths written."""
    paper = ModelSettings(num_classes=1)  # the image size when --min_size and --max_size are not typed
    size = (args.min_size or paper.min_size, args.max_size or paper.max_size)
    jitter = tuple(args.jitter) if args.jitter else None
    dataset = build_dataset(args, None, build_transform(True, *size, jitter, Augmentation(args.augment)))
    print(f"drawing the first {args.augmented} training samples of a run with seed {args.seed} and batches of "
          f"{args.batch_size}, augmented with {', '.join(args.augment) or 'flips only'}")
    return draw_training_samples(dataset, args.augmented, args.output_dir, args.batch_size, args.seed, args.workers)


def run(args: argparse.Namespace) -> None:
    """Load the images (and the model), draw, save, and say where the drawings went."""
    if args.augmented is not None:
        paths = draw_augmented(args)
    elif args.anchors:
        paths = draw_anchors(args)
    else:
        paths = draw_detections(args)
    print(f"saved {len(paths)} images to {os.path.abspath(args.output_dir)}")
    if args.show:
        show_images(paths)


def main(argv: list[str] | None = None) -> int:
    return run_script(run, parse_args(argv), "visualize.py")


if __name__ == "__main__":
    sys.exit(main())
