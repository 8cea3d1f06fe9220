"""Pascal VOC-style evaluation of a RetinaNet on a CSV-annotated dataset: per-class average precision at one IoU
threshold (0.5 by default: VOC's metric, the AP50 of the paper's tables), per-class precision and recall at a score
threshold, and one precision-recall curve per class.

    python csv_eval.py --csv_annotations val.csv --csv_classes classes.csv --model output/best.pt
    python csv_eval.py ... --pr_curves pr_curves/      # also save a precision-recall plot per class

How detections are matched and AP computed: retinanet/evaluation.py.
"""

import argparse
import sys

from retinanet.cli import add_inference_arguments, inference_options, run_script
from retinanet.dataloader import CSVDataset
from retinanet.evaluation import evaluate
from retinanet.predict import predict_with_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv_annotations", required=True, metavar="CSV", help="CSV annotations to evaluate on: path,x1,y1,x2,y2,class_name")
    parser.add_argument("--csv_classes", required=True, metavar="CSV", help="CSV class list: class_name,id (as used for training)")
    parser.add_argument("--iou_threshold", type=float, default=0.5, help="IoU a detection needs to match a box (default 0.5)")
    parser.add_argument("--score_threshold", type=float, default=0.05, help="score at which per-class precision and recall are read; AP uses all detections")
    parser.add_argument("--voc07", action="store_true", help="11-point AP of VOC2007 instead of the all-point AP of VOC2010+")
    parser.add_argument("--pr_curves", metavar="DIR", help="save one precision-recall plot (PNG) per class into DIR")
    add_inference_arguments(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    dataset = CSVDataset(args.csv_annotations, args.csv_classes)  # check the annotations before loading the model
    predictions = predict_with_checkpoint(args.model, dataset, args.csv_annotations, **inference_options(args))
    evaluate(predictions, dataset, iou_threshold=args.iou_threshold, score_threshold=args.score_threshold,
             use_07_metric=args.voc07, pr_curves_dir=args.pr_curves)
    if args.pr_curves is None:
        print("results printed above (add --pr_curves DIR to also save precision-recall plots)")


def main(argv: list[str] | None = None) -> int:
    return run_script(run, parse_args(argv), "csv_eval.py")


if __name__ == "__main__":
    sys.exit(main())
