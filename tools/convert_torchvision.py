"""Convert torchvision's RetinaNet weights (retinanet_resnet50_fpn, v1) into a checkpoint of this project.

    python tools/convert_torchvision.py retinanet_resnet50_fpn_coco-eeacb38b.pth retinanet_coco.pt

The checkpoint loads wherever a trained one does (coco_eval.py, csv_eval.py, train.py --fine_tune) and detects as
torchvision does: see retinanet/extras/interop.py for the settings it carries and how labels map.
"""

import argparse
import os
import sys

# Run as a script (python tools/convert_torchvision.py), Python puts tools/ on the path, not the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from retinanet.checkpoint import read_checkpoint, save_checkpoint  # noqa: E402
from retinanet.extras.interop import COCO_V1_BATCHNORM_EPS, convert_torchvision  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="state dict of torchvision's retinanet_resnet50_fpn (.pth)")
    parser.add_argument("output", help="checkpoint to write (.pt)")
    parser.add_argument("--source_bn_eps", type=float, default=COCO_V1_BATCHNORM_EPS,
                        help="BatchNorm epsilon torchvision runs the weights with: 0 for its COCO_V1 weights "
                             "(default), 1e-5 for a model you trained with torchvision")
    args = parser.parse_args(argv)

    print(f"reading torchvision's weights from {args.source}")
    try:
        checkpoint = convert_torchvision(read_checkpoint(args.source), args.source_bn_eps)
    except ValueError as error:  # not a readable file, or not torchvision's RetinaNet; the message says which
        print(f"convert_torchvision.py: error: {error}", file=sys.stderr)
        return 2
    settings = ", ".join(f"{name}={value}" for name, value in checkpoint["model_settings"].items())
    print(f"converted to a RetinaNet with {len(checkpoint['class_names'])} classes and settings: {settings}")
    save_checkpoint(checkpoint, args.output)
    print(f"checkpoint written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
