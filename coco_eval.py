"""COCO evaluation of a RetinaNet (the paper's main metric, §5: AP averaged over IoU thresholds 0.5:0.95, with
AP50, AP75 and AP by object size as in Table 2): detections in COCO's results format, written to a JSON file,
and scored by pycocotools' COCOeval.

    python coco_eval.py --coco_path /data/coco --set_name val2017 --model output/best.pt
"""

import argparse
import sys

from retinanet.data.datasets import CocoDataset
from retinanet.engine.batch_inference import cap_report, check_class_names, predict_dataset
from retinanet.engine.coco_evaluation import MAX_DETECTIONS_PER_IMAGE, evaluate_coco
from retinanet.engine.flags import inference_flags, inference_settings, run_script
from retinanet.engine.models import load_model
from retinanet.engine.runtime import resolve_device
from retinanet.transforms import build_transform


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco_path", required=True, metavar="PATH", help="COCO root holding annotations/instances_{set}.json and images/{set}/ or {set}/")
    parser.add_argument("--set_name", default="val2017", help="which set to evaluate on (default val2017)")
    parser.add_argument("--output_dir", default=".", metavar="DIR", help="where {set_name}_bbox_results.json is written (default: here)")
    for name, options in inference_flags():
        parser.add_argument(name, **options)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    model, class_names = load_model(args.model, device, **inference_settings(vars(args)))
    transform = build_transform(False, model.settings.min_size, model.settings.max_size)
    dataset = CocoDataset(args.coco_path, args.set_name, transform)
    check_class_names(class_names, dataset.class_names)
    print(f"detecting with {args.model} on {len(dataset)} images of COCO {args.set_name} ({dataset.num_classes} "
          f"classes) on {device}")
    predictions = predict_dataset(model, dataset, batch_size=args.batch_size, workers=args.workers)
    print(cap_report(predictions, model.settings.max_detections) or "no image reached the cap of detections")
    # COCO's metric counts 100 detections an image, or those asked for with --max_detections
    stats = evaluate_coco(predictions, dataset, output_dir=args.output_dir, set_name=args.set_name,
                          max_detections=args.max_detections or MAX_DETECTIONS_PER_IMAGE)
    print(f"AP@[.5:.95] {stats[0]:.4f}, AP50 {stats[1]:.4f}, AP75 {stats[2]:.4f}")


def main(argv: list[str] | None = None) -> int:
    return run_script(run, parse_args(argv), "coco_eval.py")


if __name__ == "__main__":
    sys.exit(main())
