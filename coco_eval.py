"""COCO evaluation of a RetinaNet (the paper's main metric, §5: AP averaged over IoU thresholds 0.5:0.95, with
AP50, AP75 and AP by object size as in Table 2): detections in COCO's results format, written to a JSON file,
and scored by pycocotools' COCOeval.

    python coco_eval.py --coco_path /data/coco --set_name val2017 --model output/best.pt
"""

import argparse
import sys

from retinanet.engine.flags import add_inference_arguments, inference_options, run_script
from retinanet.engine.coco_evaluation import evaluate_coco
from retinanet.dataloader import CocoDataset
from retinanet.engine.prediction import predict_with_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco_path", required=True, metavar="PATH", help="COCO root holding annotations/instances_{set}.json and images/{set}/ or {set}/")
    parser.add_argument("--set_name", default="val2017", help="which set to evaluate on (default val2017)")
    parser.add_argument("--output_dir", default=".", metavar="DIR", help="where {set_name}_bbox_results.json is written (default: here)")
    add_inference_arguments(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    dataset = CocoDataset(args.coco_path, args.set_name)  # check the annotations before loading the model
    predictions = predict_with_checkpoint(args.model, dataset, f"COCO {args.set_name}", **inference_options(args))
    stats = evaluate_coco(predictions, dataset, output_dir=args.output_dir, set_name=args.set_name)
    print(f"AP@[.5:.95] {stats[0]:.4f}, AP50 {stats[1]:.4f}, AP75 {stats[2]:.4f}")


def main(argv: list[str] | None = None) -> int:
    return run_script(run, parse_args(argv), "coco_eval.py")


if __name__ == "__main__":
    sys.exit(main())
