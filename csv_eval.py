"""Pascal VOC-style evaluation of a RetinaNet on a CSV-annotated dataset or Pascal VOC XML files: per-class average
precision at one IoU threshold (0.5 by default: VOC's metric, the AP50 of the paper's tables), per-class precision
and recall at a score threshold, and one precision-recall curve per class.

    python csv_eval.py --csv_val val.csv --classes classes.csv --model output/best.pt
    python csv_eval.py --voc_path VOCdevkit/VOC2007 --val_set test --model output/best.pt   # 11-point AP
    python csv_eval.py ... --pr_curves pr_curves/      # also save a precision-recall plot per class
    python csv_eval.py --csv_val large.csv --classes classes.csv --model output/best.pt --tile_size 800

On VOC data, difficult objects are neither hits nor misses, and VOC2007's test set is scored with the 11-point AP
of its development kit (--no_voc07 for the all-point AP).

With --tile_size SIZE, images larger than SIZE x SIZE pixels are predicted tile by tile as predict.py --tile_size
does (retinanet/extras/tiling.py), and scored in their own pixels.

How detections are matched and AP computed: retinanet/evaluation.py.
"""

import argparse
import sys

from torch import nn

from retinanet.checkpoint import load_model
from retinanet.dataloader import CSVDataset, build_transform, read_class_list
from retinanet.evaluation import check_class_names, evaluate, predict_dataset
from retinanet.inference import cap_report
from retinanet.settings import INFERENCE_SETTINGS, add_inference_flags, resolve_device, run_script, typed_settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv_val", metavar="CSV", help="CSV annotations to evaluate on: path,x1,y1,x2,y2,class_name")
    parser.add_argument("--classes", metavar="CSV", help="class list, rows class_name,id, as used for training (with --voc_path, default: the model's classes)")
    parser.add_argument("--drop_degenerate_boxes", action="store_true", help="leave out CSV boxes without area (x2 <= x1 or y2 <= y1), counted and named, instead of stopping")
    parser.add_argument("--voc_path", nargs="+", metavar="ROOT", help="evaluate on Pascal VOC instead: VOC roots (e.g. VOCdevkit/VOC2007) or folders of XML files next to their images")
    parser.add_argument("--val_set", default="test", help="with --voc_path: the set, ImageSets/Main/{set}.txt (default test)")
    parser.add_argument("--iou_threshold", type=float, default=0.5, help="IoU a detection needs to match a box (default 0.5)")
    parser.add_argument("--pr_threshold", type=float, default=0.05, help="score at which per-class precision and recall are read; AP uses all detections")
    parser.add_argument("--voc07", action="store_const", const=True, help="11-point AP of VOC2007 instead of the all-point AP of VOC2010+ (the default on VOC2007's test set)")
    parser.add_argument("--no_voc07", dest="voc07", action="store_false", help="the all-point AP on VOC2007's test set too")
    parser.add_argument("--pr_curves", metavar="DIR", help="save one precision-recall plot (PNG) per class into DIR")
    parser.add_argument("--tile_size", type=int, metavar="SIZE", help="predict images larger than SIZE x SIZE pixels tile by tile, as predict.py does")
    parser.add_argument("--tile_overlap", type=float, metavar="FRACTION", help="with --tile_size: how much neighbouring tiles overlap at least (default 0.25)")
    parser.add_argument("--allow_large_images", action="store_true", help="with --tile_size: read images past Pillow's limit of about 89 million pixels")
    add_inference_flags(parser)
    args = parser.parse_args(argv)
    if (args.csv_val is None) == (args.voc_path is None):
        parser.error("give either --csv_val CSV (with --classes CSV) or --voc_path ROOT")
    if args.csv_val and not args.classes:
        parser.error("--csv_val needs --classes")
    for flag in ("tile_overlap", "allow_large_images"):
        if args.tile_size is None and getattr(args, flag) not in (None, False):  # None, False: not typed
            parser.error(f"--{flag} needs --tile_size")
    return args


def run(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    model, class_names = load_model(args.model, device, **typed_settings(vars(args), INFERENCE_SETTINGS))
    transform = build_transform(False, model.settings.min_size, model.settings.max_size)
    if args.csv_val:
        dataset = CSVDataset(args.csv_val, args.classes, transform, args.drop_degenerate_boxes)
        source = args.csv_val
    else:  # VOC's classes are the model's unless --classes says otherwise
        from retinanet.data.voc import VOCDataset

        voc_classes = read_class_list(args.classes) if args.classes else class_names
        dataset = VOCDataset(args.voc_path, args.val_set, voc_classes, transform)
        source = f"VOC set {args.val_set} of {', '.join(args.voc_path)}"
    check_class_names(class_names, dataset.class_names)
    print(f"detecting with {args.model} on {len(dataset)} images of {source} ({dataset.num_classes} classes) on "
          f"{device}")
    if args.tile_size is None:
        predictions = predict_dataset(model, dataset, batch_size=args.batch_size, workers=args.workers)
        print(cap_report(predictions, model.settings.max_detections))
    else:
        predictions = predict_tiles(model, dataset.image_paths, args)
    evaluate(predictions, dataset, iou_threshold=args.iou_threshold, pr_threshold=args.pr_threshold,
             use_07_metric=args.voc07, pr_curves_dir=args.pr_curves)
    if args.pr_curves is None:
        print("results printed above (add --pr_curves DIR to also save precision-recall plots)")


def predict_tiles(model: nn.Module, image_paths: list[str], args: argparse.Namespace) -> list[dict]:
    """Predictions on every image, tiled (extras/tiling.py); ValueError naming the images that could not be read,
    since a score needs them all."""
    from retinanet.extras.tiling import DEFAULT_OVERLAP, ImageWindows, describe_windows, predict_windows

    overlap = DEFAULT_OVERLAP if args.tile_overlap is None else args.tile_overlap
    windows = ImageWindows(image_paths, model.settings.min_size, model.settings.max_size, args.tile_size, overlap,
                           args.allow_large_images)
    print(f"tiled prediction on {len(image_paths)} images ({describe_windows(windows, args.tile_size)}; overlap >= "
          f"{overlap:g})")
    predictions = predict_windows(model, windows, args.batch_size, args.workers)
    unread = [windows.unread_reason(number) for number, prediction in enumerate(predictions) if prediction is None]
    if unread:
        raise ValueError(f"{len(unread)} image(s) could not be read: " + "; ".join(unread[:5]))
    return predictions


def main(argv: list[str] | None = None) -> int:
    return run_script(run, parse_args(argv), "csv_eval.py")


if __name__ == "__main__":
    sys.exit(main())
