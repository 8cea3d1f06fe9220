"""The paper's Figure 1, Figure 4 and the trend of Table 1a/1b, computed by this project's own code on a CPU.

    python tools/paper_figures.py figure1                          # §3.2: the focal loss against p_t
    python tools/paper_figures.py figure4 --model output/best.pt   # §5.1: CDFs of the loss of a trained model
    python tools/paper_figures.py table1                           # §5.1: 6 training runs, 28 min on 2 cores
    python tools/paper_figures.py table1 --quick                   # the same 6 rows, 200 images for 4 epochs each

Each writes a PNG (and table1 a Markdown table) into --output_dir (default figures/) and prints the numbers behind
it. Figure 4 reads any checkpoint train.py writes, on the demo's validation images by default or on CSV, COCO or VOC
data. Table 1's rows are ordinary train.py runs on the shapes demo with --focal_gamma and --focal_alpha, the same
seed, data and iterations for each, scored by COCO's AP and AP50 (retinanet/data/coco.py).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script, Python puts tools/ on the path, not the repository root

from retinanet.checkpoint import load_model  # noqa: E402
from retinanet.data.coco import CocoDataset, evaluate_coco  # noqa: E402
from retinanet.data.shapes import make_shapes_dataset, make_shapes_demo  # noqa: E402
from retinanet.data.voc import VOCDataset  # noqa: E402
from retinanet.dataloader import CSVDataset, build_transform, collate, read_class_list  # noqa: E402
from retinanet.evaluation import predict_dataset  # noqa: E402
from retinanet.losses import IGNORED, focal_loss, label_anchors  # noqa: E402
from retinanet.settings import run_script  # noqa: E402

FIGURE1_GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)  # Figure 1's curves
FIGURE4_GAMMAS = (0.0, 0.5, 1.0, 2.0)  # Figure 4's curves
# Table 1a: α-balanced CE (γ = 0) at three α; Table 1b: γ with the α the paper pairs it with (0.25 for γ = 2). The
# paper's AP and AP50 (ResNet-50, 600 pixels, COCO minival) beside each row.
TABLE1_ROWS = (
    ("1a", 0.0, 0.25, 10.8, 16.0), ("1a", 0.0, 0.50, 30.2, 46.7), ("1a", 0.0, 0.75, 31.1, 49.4),
    ("1b", 0.5, 0.50, 32.9, 51.7), ("1b", 1.0, 0.25, 33.7, 52.0), ("1b", 2.0, 0.25, 34.0, 52.5),
)
TABLE1_RUNS = {"default": dict(train=500, val=100, epochs=6), "quick": dict(train=200, val=50, epochs=4)}


# ------------------------------------------------------------------------------------------------ Figure 1


def figure1_losses(p_t: np.ndarray, gammas=FIGURE1_GAMMAS) -> dict[float, np.ndarray]:
    """FL(p_t) = −(1 − p_t)^γ log(p_t) (Eq. 4, no α as in Figure 1) at each probability of the ground-truth class,
    by retinanet.losses.focal_loss on the logit of p_t with target 1."""
    logits = torch.logit(torch.as_tensor(p_t, dtype=torch.float64))
    targets = torch.ones_like(logits)
    return {gamma: focal_loss(logits, targets, alpha=-1, gamma=gamma).numpy() for gamma in gammas}


def plot_figure1(path: str) -> dict[float, np.ndarray]:
    """Figure 1 as the paper draws it: loss 0..5 against p_t 0..1, one curve per γ."""
    p_t = np.linspace(0.001, 1.0, 500)
    curves = figure1_losses(p_t)
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for gamma, loss in curves.items():
        axes.plot(p_t, loss, label=f"γ = {gamma:g}")
    axes.set(xlabel="probability of ground truth class", ylabel="loss", xlim=(0, 1), ylim=(0, 5))
    axes.annotate("well-classified examples", xy=(0.75, 0.3), xytext=(0.55, 1.6), arrowprops=dict(arrowstyle="->"))
    axes.legend(title="FL(p_t) = −(1 − p_t)^γ log(p_t)")
    save(figure, path)
    return figure1_losses(np.array([0.1, 0.5, 0.9]))


# ------------------------------------------------------------------------------------------------ Figure 4


@torch.no_grad()
def labelled_logits(model, dataset, num_images: int, batch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of every (anchor, class) pair that training labels 1 (positives) and 0 (negatives) on the first
    `num_images` images of `dataset`, ignored anchors left out, labelled by the model's own loss: two 1-D float32
    tensors."""
    model.eval()
    subset = Subset(dataset, range(min(num_images, len(dataset))))
    positives, negatives = [], []
    for batch in DataLoader(subset, batch_size=batch_size, collate_fn=collate):
        images = batch["images"]
        cls_logits, _ = model.network_outputs(images)  # (B, R, K)
        matches, _, positive = label_anchors(model.anchors(images), batch["annotations"], model.settings)
        counted = (matches != IGNORED)[..., None].expand_as(positive)  # (B, R, K)
        positives.append(cls_logits[positive & counted].float())
        negatives.append(cls_logits[~positive & counted].float())
    return torch.cat(positives), torch.cat(negatives)


def loss_cdf(logits: torch.Tensor, positive: bool, gamma: float) -> np.ndarray:
    """§5.1 "Analysis of the Focal Loss": the focal loss of each sample, "normalize[d] such that it sums to one",
    sorted "from lowest to highest": its cumulative sum, whose last value is 1."""
    targets = torch.full_like(logits, float(positive))
    losses = focal_loss(logits.double(), targets, alpha=-1, gamma=gamma).sort().values
    return (losses.cumsum(0) / losses.sum()).numpy()


def figure4_cdfs(positives: torch.Tensor, negatives: torch.Tensor,
                 gammas=FIGURE4_GAMMAS) -> dict[str, dict[float, np.ndarray]]:
    """The CDFs of Figure 4, for the positive and the negative samples, at each γ."""
    return {"positive": {gamma: loss_cdf(positives, True, gamma) for gamma in gammas},
            "negative": {gamma: loss_cdf(negatives, False, gamma) for gamma in gammas}}


def plot_figure4(cdfs: dict[str, dict[float, np.ndarray]], path: str) -> None:
    """Figure 4: cumulative normalised loss against the fraction of foreground (left) and background (right)
    samples, one curve per γ."""
    figure, panels = plt.subplots(1, 2, figsize=(10, 4.5))
    for axes, (kind, curves) in zip(panels, cdfs.items()):
        for gamma, cdf in curves.items():
            step = max(1, len(cdf) // 2000)  # at most ~2,000 points a curve
            axes.plot(np.arange(1, len(cdf) + 1)[::step] / len(cdf), cdf[::step], label=f"γ = {gamma:g}")
        name = "foreground" if kind == "positive" else "background"
        axes.set(xlabel=f"fraction of {name} examples", ylabel="cumulative normalized loss", xlim=(0, 1), ylim=(0, 1),
                 title=f"{kind} samples ({len(next(iter(curves.values()))):,})")
        axes.legend()
    save(figure, path)


def hardest_share(cdf: np.ndarray, fraction: float = 0.2) -> float:
    """The share of the loss carried by the hardest `fraction` of the samples: 1 − CDF at 1 − fraction."""
    return float(1 - cdf[int(len(cdf) * (1 - fraction)) - 1])


def evaluation_dataset(args: argparse.Namespace, class_names: list[str], transform):
    """The images Figure 4 is computed on: COCO, VOC or CSV data, by default the demo's validation set."""
    if args.coco_path:
        return CocoDataset(args.coco_path, args.val_set, transform)
    if args.voc_path:
        names = read_class_list(args.classes) if args.classes else class_names
        return VOCDataset(args.voc_path, args.val_set, names, transform)
    return CSVDataset(args.csv_val, args.classes, transform)


# ------------------------------------------------------------------------------------------------ Table 1


def train_row(gamma: float, alpha: float, run: dict, output_dir: str, seed: int) -> str:
    """One row's training run: train.py on the shapes demo with this γ and α; returns its last.pt."""
    out = os.path.join(output_dir, f"gamma{gamma:g}_alpha{alpha:g}")
    flags = ["--data_dir", os.path.join(output_dir, "shapes"), "--shapes_train", str(run["train"]),
             "--shapes_val", str(run["val"]), "--epochs", str(run["epochs"]), "--eval_every", "0",
             "--seed", str(seed), "--focal_gamma", str(gamma), "--focal_alpha", str(alpha), "--output_dir", out]
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags], check=True, cwd=ROOT)
    return os.path.join(out, "last.pt")


def coco_scores(checkpoint: str, coco_root: str, set_name: str, output_dir: str) -> tuple[float, float]:
    """COCO's AP@[.5:.95] and AP50 of a checkpoint on the demo's validation set."""
    model = load_model(checkpoint).model
    dataset = CocoDataset(coco_root, set_name, build_transform(False, model.settings.min_size, model.settings.max_size))
    stats = evaluate_coco(predict_dataset(model, dataset), dataset, output_dir, set_name)
    return stats[0], stats[1]


def table1_markdown(rows: list[dict], run: dict, minutes: float) -> str:
    lines = ["| table | γ | α | AP here | AP50 here | AP paper | AP50 paper |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['table']} | {r['gamma']:g} | {r['alpha']:g} | {100 * r['ap']:.1f} | {100 * r['ap50']:.1f} | "
              f"{r['paper_ap']} | {r['paper_ap50']} |" for r in rows]
    lines.append(f"\n{run['train']} training and {run['val']} validation images of the shapes demo, {run['epochs']} "
                 f"epochs a row, {minutes:.0f} minutes in all")
    return "\n".join(lines)


def plot_table1(rows: list[dict], path: str) -> None:
    figure, axes = plt.subplots(figsize=(8, 4))
    names = [f"γ={r['gamma']:g}\nα={r['alpha']:g}" for r in rows]
    positions = np.arange(len(rows))
    axes.bar(positions - 0.2, [100 * r["ap50"] for r in rows], 0.4, label="AP50")
    axes.bar(positions + 0.2, [100 * r["ap"] for r in rows], 0.4, label="AP")
    axes.set_xticks(positions, names)
    axes.set(ylabel="COCO metric on the demo's validation images", title="Table 1a (γ = 0) and 1b, shapes demo")
    axes.legend()
    save(figure, path)


# ------------------------------------------------------------------------------------------------ commands


def save(figure, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}")


def run_figure1(args: argparse.Namespace) -> None:
    values = plot_figure1(os.path.join(args.output_dir, "figure1.png"))
    print("FL(p_t) at p_t = 0.1, 0.5, 0.9:")
    for gamma, losses in values.items():
        print(f"  γ = {gamma:g}: " + ", ".join(f"{loss:.4f}" for loss in losses))


def run_figure4(args: argparse.Namespace) -> None:
    model, class_names = load_model(args.model)
    transform = build_transform(False, model.settings.min_size, model.settings.max_size)
    dataset = evaluation_dataset(args, class_names, transform)
    positives, negatives = labelled_logits(model, dataset, args.images)
    print(f"{args.model} (trained with γ = {model.settings.focal_gamma:g}) on {min(args.images, len(dataset))} images: "
          f"{len(positives):,} positive and {len(negatives):,} negative samples")
    cdfs = figure4_cdfs(positives, negatives)
    plot_figure4(cdfs, os.path.join(args.output_dir, "figure4.png"))
    for kind, curves in cdfs.items():
        shares = ", ".join(f"γ = {gamma:g}: {hardest_share(cdf):.1%}" for gamma, cdf in curves.items())
        print(f"share of the loss in the hardest 20% of the {kind} samples: {shares}")


def run_table1(args: argparse.Namespace) -> None:
    run = TABLE1_RUNS["quick" if args.quick else "default"]
    start = time.perf_counter()
    data_dir = os.path.join(args.output_dir, "shapes")
    make_shapes_demo(data_dir, run["train"], run["val"], args.seed)  # as train.py makes it, for every row
    val = make_shapes_dataset(data_dir, "val", run["val"], seed=args.seed + 1)  # the same files: paths of its COCO JSON
    rows = []
    for table, gamma, alpha, paper_ap, paper_ap50 in TABLE1_ROWS:
        checkpoint = train_row(gamma, alpha, run, args.output_dir, args.seed)
        ap, ap50 = coco_scores(checkpoint, val["coco_root"], val["set_name"], os.path.dirname(checkpoint))
        rows.append(dict(table=table, gamma=gamma, alpha=alpha, ap=ap, ap50=ap50, paper_ap=paper_ap,
                         paper_ap50=paper_ap50))
        print(f"table {table}, γ = {gamma:g}, α = {alpha:g}: AP {100 * ap:.1f}, AP50 {100 * ap50:.1f}", flush=True)
    markdown = table1_markdown(rows, run, (time.perf_counter() - start) / 60)
    with open(os.path.join(args.output_dir, "table1.md"), "w") as file:
        file.write(markdown + "\n")
    with open(os.path.join(args.output_dir, "table1.json"), "w") as file:
        json.dump(dict(run=run, rows=rows), file, indent=1)
    plot_table1(rows, os.path.join(args.output_dir, "table1.png"))
    print(markdown)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("figure1", "figure4", "table1"))
    parser.add_argument("--output_dir", default="figures", help="where the PNG files (and table1.md) go")
    figure4 = parser.add_argument_group("figure4")
    figure4.add_argument("--model", default="output/best.pt", help="a checkpoint (default: the demo's best model)")
    figure4.add_argument("--images", type=int, default=100, help="how many images to sample the anchors of")
    figure4.add_argument("--csv_val", default="data/shapes/val.csv", help="CSV data (default: the demo's validation set)")
    figure4.add_argument("--classes", default="data/shapes/classes.csv", help="its class list")
    figure4.add_argument("--coco_path", help="COCO data instead: annotations/instances_{set}.json and its images")
    figure4.add_argument("--voc_path", nargs="+", metavar="ROOT", help="Pascal VOC data instead")
    figure4.add_argument("--val_set", default="val2017", help="COCO or VOC set")
    table1 = parser.add_argument_group("table1")
    table1.add_argument("--quick", action="store_true", help=f"shorter runs: {TABLE1_RUNS['quick']}, not {TABLE1_RUNS['default']}")
    table1.add_argument("--seed", type=int, default=0, help="the seed of every row's data and training")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    commands = {"figure1": run_figure1, "figure4": run_figure4, "table1": run_table1}
    return run_script(commands[args.what], args, "paper_figures.py")


if __name__ == "__main__":
    sys.exit(main())
