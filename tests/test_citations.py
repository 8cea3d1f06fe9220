"""The code is read beside the paper: every section it cites exists, a section named in quotes is named as the
paper names it, and the detector (FPN, anchors, subnets, box regression, inference, optimization) is never cited
as §3.3, which is "Class Imbalance and Model Initialization"."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Lin et al. 2017, arXiv:1708.02002 v2: each section's title and the names of its run-in paragraphs.
SECTIONS = {
    "3": ("Focal Loss",),
    "3.1": ("Balanced Cross Entropy",),
    "3.2": ("Focal Loss Definition",),
    "3.3": ("Class Imbalance and Model Initialization",),
    "3.4": ("Class Imbalance and Two-stage Detectors",),
    "4": ("RetinaNet Detector", "Feature Pyramid Network Backbone", "Anchors", "Classification Subnet",
          "Box Regression Subnet"),
    "4.1": ("Inference and Training", "Inference", "Focal Loss", "Initialization", "Optimization"),
    "5": ("Experiments",),
    "5.1": ("Training Dense Detection", "Network Initialization", "Balanced Cross Entropy", "Focal Loss",
            "Analysis of the Focal Loss", "Online Hard Example Mining (OHEM)", "Hinge Loss"),
    "5.2": ("Model Architecture Design", "Anchor Density", "Speed versus Accuracy"),
    "5.3": ("Comparison to State of the Art",),
}
CITATION = re.compile(r'§\s*(\d+(?:\.\d+)?)(?:,? (?:paragraph )?"([^"]+)")?')
DETECTOR_WORDS = re.compile(r"(?i)FPN|pyramid|anchor|subnet|detector|inference|regression|optimi[sz]ation")


def cited_lines() -> list[tuple[str, int, str]]:
    files = sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("retinanet/*.py")) + sorted(ROOT.glob("tools/*.py"))
    lines = []
    for path in files + [ROOT / "README.md"]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if "§" in line:
                lines.append((str(path.relative_to(ROOT)), number, line))
    return lines


def test_the_project_cites_the_paper():
    assert len(cited_lines()) > 50


@pytest.mark.parametrize("where,number,line", cited_lines())
def test_each_citation_names_a_section_as_the_paper_does(where, number, line):
    for section, name in CITATION.findall(line):
        assert section in SECTIONS, f"{where}:{number}: §{section} is not a section of the paper"
        if name:
            assert name in SECTIONS[section], f"{where}:{number}: §{section} is {SECTIONS[section]}, not {name!r}"
    if "§3.3" in line:
        assert not DETECTOR_WORDS.search(line), f"{where}:{number}: the detector is §4 and §4.1, not §3.3"
