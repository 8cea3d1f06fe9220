"""tools/paper_figures.py: the numbers behind Figure 1, Figure 4 and Table 1, not the pixels."""

import json
import math

import numpy as np
import pytest
import torch

from retinanet.checkpoint import load_model
from retinanet.dataloader import CSVDataset, build_transform
from retinanet.losses import IGNORED, match_batch
from tools import paper_figures


def test_figure1_is_the_closed_form_of_eq_4():
    p_t = np.array([0.01, 0.1, 0.5, 0.9, 0.999])
    for gamma, losses in paper_figures.figure1_losses(p_t).items():
        expected = [-((1 - p) ** gamma) * math.log(p) for p in p_t]
        np.testing.assert_allclose(losses, expected, rtol=1e-12)
    assert paper_figures.figure1_losses(np.array([0.5]), gammas=(2.0,))[2.0][0] == pytest.approx(0.25 * math.log(2))


def test_figure4_cdfs_end_at_1_and_gamma_2_concentrates_the_negatives_loss():
    generator = torch.Generator().manual_seed(0)
    positives = torch.randn(2_000, generator=generator) * 2 + 1  # mostly well classified, some hard
    negatives = torch.randn(200_000, generator=generator) * 1.5 - 5  # easy negatives, a tail of hard ones
    cdfs = paper_figures.figure4_cdfs(positives, negatives)
    for curves in cdfs.values():
        for cdf in curves.values():
            assert cdf[-1] == pytest.approx(1.0) and np.all(np.diff(cdf) >= 0) and cdf[0] >= 0
    negative = cdfs["negative"]
    shares = [paper_figures.hardest_share(negative[gamma]) for gamma in (0.0, 0.5, 1.0, 2.0)]
    assert shares == sorted(shares) and shares[-1] > 0.9 > shares[0]  # §5.1: with γ = 2 the hard negatives dominate
    assert paper_figures.hardest_share(np.linspace(0.2, 1.0, 5)) == pytest.approx(0.2)  # 1 - cdf[3] = 1 - 0.8


def test_figure4_samples_each_anchor_and_class_as_training_labels_them(trained_shapes_run, tmp_path):
    model = load_model(trained_shapes_run.checkpoint).model
    transform = build_transform(False, model.settings.min_size, model.settings.max_size)
    dataset = CSVDataset(f"{trained_shapes_run.data_dir}/val.csv", f"{trained_shapes_run.data_dir}/classes.csv",
                         transform)
    positives, negatives = paper_figures.labelled_logits(model, dataset, num_images=3, batch_size=2)
    foreground = counted = 0
    for index in range(3):
        item = dataset[index]
        images = item["image"][None]
        matches = match_batch(model.anchors(images), item["annotations"][None, :, :4],
                              item["annotations"][None, :, 4] >= 0)
        foreground += int((matches >= 0).sum())
        counted += int((matches != IGNORED).sum())
    # Images batched in pairs are padded to the same size: their padding anchors are background, counted too
    assert len(positives) == foreground and len(positives) + len(negatives) >= counted * model.num_classes
    assert paper_figures.main(["figure4", "--model", trained_shapes_run.checkpoint, "--images", "2",
                               "--csv_val", f"{trained_shapes_run.data_dir}/val.csv",
                               "--classes", f"{trained_shapes_run.data_dir}/classes.csv",
                               "--output_dir", str(tmp_path)]) == 0
    assert (tmp_path / "figure4.png").stat().st_size > 0


def test_table1_trains_and_scores_each_row(tmp_path, monkeypatch):
    monkeypatch.setitem(paper_figures.TABLE1_RUNS, "quick", dict(train=8, val=4, epochs=1))
    monkeypatch.setattr(paper_figures, "TABLE1_ROWS", (("1b", 2.0, 0.25, 34.0, 52.5),))
    assert paper_figures.main(["table1", "--quick", "--output_dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "table1.json").read_text())
    (row,) = result["rows"]
    assert (row["gamma"], row["alpha"], result["run"]["epochs"]) == (2.0, 0.25, 1) and 0 <= row["ap"] <= row["ap50"] <= 1
    trained = load_model(str(tmp_path / "gamma2_alpha0.25" / "last.pt")).model.settings
    assert (trained.focal_gamma, trained.focal_alpha) == (2.0, 0.25)
    assert "| 1b | 2 | 0.25 |" in (tmp_path / "table1.md").read_text()
