"""The README and the docs say what is true: every command's flags are in its script's --help, every flag named in
the prose is some script's, and every file they point to exists."""

import contextlib
import io
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TORCHRUN_FLAGS = {"--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_endpoint", "--master_port"}
SCRIPTS = ["train.py", "predict.py", "csv_eval.py", "coco_eval.py", "visualize.py",
           *(f"tools/{path.name}" for path in sorted((ROOT / "tools").glob("*.py")))]


def help_text(script: str) -> str:
    """What `python script --help` prints, from the script's own main in this process."""
    from test_interop import load_tool

    module = load_tool(pathlib.Path(script).stem) if script.startswith("tools/") else __import__(script[:-3])
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.suppress(SystemExit):  # argparse exits after its help
        (module.parse_args if hasattr(module, "parse_args") else module.main)(["--help"])
    return output.getvalue()


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return {script: help_text(script) for script in SCRIPTS}


def commands() -> list[tuple[str, str, str]]:
    """(page, script, command line) of every command of a code block that runs one of the scripts (a line continued
    with a backslash joined to the next)."""
    found = []
    for page in PAGES:
        blocks = re.findall(r"```(?:bash)?\n(.*?)```", page.read_text(encoding="utf-8"), re.DOTALL)
        for line in (line for block in blocks for line in block.replace("\\\n", " ").splitlines()):
            words = shlex.split(line.split(" # ")[0], comments=False) if "python" in line or "torchrun" in line else []
            scripts = [word for word in words if word in SCRIPTS]
            if scripts:
                found.append((page.name, scripts[-1], line))  # a tool's script argument takes the flags
    return found


@pytest.mark.parametrize("page, script, line", commands())
def test_every_flag_of_a_command_is_in_its_scripts_help(helps, page, script, line):
    for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", line.split(script, 1)[1].split(" # ")[0]):
        assert re.search(rf"{flag}\b", helps[script]), f"{page}: {script} has no {flag}: {line}"


def test_every_flag_the_pages_name_is_a_scripts(helps):
    every_help = "\n".join(helps.values())
    for page in PAGES:
        for flag in set(re.findall(r"`[^`]*?(--[a-z][a-z0-9_]*)", page.read_text(encoding="utf-8"))) - TORCHRUN_FLAGS:
            assert re.search(rf"{flag}\b", every_help), f"{page.name} names {flag}, which no script takes"


def test_the_files_the_pages_point_to_exist():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for path in set(re.findall(r"(?:docs|retinanet|tools|tests)/[\w/]+\.(?:md|py|png)", text)):
            assert (ROOT / path).exists(), f"{page.name} points to {path}"


def test_the_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```bash\n(.*?)```", text, re.DOTALL)[1]
    assert "pip install -r requirements.txt && python train.py" in first_block
    assert "pip install -r requirements.txt -r requirements-dev.txt && python -m pytest -q" in first_block
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
