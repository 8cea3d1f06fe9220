"""pyproject.toml: `pip install -e .` installs the package with the dependencies of requirements.txt."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_package_depends_on_what_requirements_txt_lists():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert project["dependencies"] == [line for line in requirements if line]


def test_setuptools_finds_the_package_and_its_three_subpackages():
    from setuptools import find_packages

    assert sorted(find_packages(str(ROOT), include=["retinanet*"])) == [
        "retinanet", "retinanet.data", "retinanet.diagnostics", "retinanet.extras"]
