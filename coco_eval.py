"""COCO evaluation of a RetinaNet (the paper's main metric, §5: AP averaged over IoU thresholds 0.5:0.95, with
AP50, AP75 and AP by object size as in Table 2): detections in COCO's results format, written to a JSON file,
and scored by pycocotools' COCOeval.

    python coco_eval.py --coco_path /data/coco --val_set val2017 --model output/best.pt
"""

import argparse
import sys

from retinanet.checkpoint import load_model
from retinanet.data.coco import MAX_DETECTIONS_PER_IMAGE, CocoDataset, evaluate_coco
from retinanet.dataloader import build_transform
from retinanet.evaluation import check_class_names, predict_dataset
from retinanet.inference import cap_report
from retinanet.settings import INFERENCE_SETTINGS, add_inference_flags, resolve_device, run_script, typed_settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco_path", required=True, metavar="PATH", help="COCO root holding annotations/instances_{set}.json and images/{set}/ or {set}/")
    parser.add_argument("--val_set", default="val2017", help="which set to evaluate on (default val2017)")
    parser.add_argument("--output_dir", default=".", metavar="DIR", help="where {val_set}_bbox_results.json is written (default: here)")
    add_inference_flags(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    model, class_names = load_model(args.model, device, **typed_settings(vars(args), INFERENCE_SETTINGS))
    transform = build_transform(False, model.settings.min_size, model.settings.max_size)
    dataset = CocoDataset(args.coco_path, args.val_set, transform)
    check_class_names(class_names, dataset.class_names)
    print(f"detecting with {args.model} on {len(dataset)} images of COCO {args.val_set} ({dataset.num_classes} "
          f"classes) on {device}")
    predictions = predict_dataset(model, dataset, batch_size=args.batch_size, workers=args.workers)
    print(cap_report(predictions, model.settings.max_detections))
    # COCO's metric counts 100 detections an image, or those asked for with --max_detections
    stats = evaluate_coco(predictions, dataset, output_dir=args.output_dir, set_name=args.val_set,
                          max_detections=args.max_detections or MAX_DETECTIONS_PER_IMAGE)
    print(f"AP@[.5:.95] {stats[0]:.4f}, AP50 {stats[1]:.4f}, AP75 {stats[2]:.4f}")


def main(argv: list[str] | None = None) -> int:
    return run_script(run, parse_args(argv), "coco_eval.py")


if __name__ == "__main__":
    sys.exit(main())
