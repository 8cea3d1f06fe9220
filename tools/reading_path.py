"""Measure the reading path: the project's files and lines that one run of a script actually executes.

    python tools/reading_path.py train.py --dataset csv --csv_train train.csv --classes classes.csv \
        --csv_val val.csv --iters 2 --workers 0
    python tools/reading_path.py predict.py --model output/best.pt photos/ --output detections.csv --workers 0

The script's `main(argv)` runs under `sys.setprofile`, which sees every Python function called. A file is on the
path when one of its functions ran; its lines are those of the functions that ran, each from its `def` (or its
first decorator) to its last line, a function nested in another counted once. A script at the top of the
repository counts whole. Module-level code (imports, constants, class bodies) is not counted: importing a module
runs nothing of what a reader follows. Run with `--workers 0`, so that the data loading runs in this process and is
seen too.
"""

import ast
import functools
import importlib
import pathlib
import sys
import threading
from collections.abc import Callable
from typing import NamedTuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script, Python puts tools/ on the path, not the repository root
SKIPPED_FOLDERS = ("tests", "tools")  # the harness, not the path


class ReadingPath(NamedTuple):
    """The files a run executed (relative paths, in reading order of first call) and the lines counted in each."""

    lines: dict[str, int]

    @property
    def files(self) -> list[str]:
        return list(self.lines)

    @property
    def total_lines(self) -> int:
        return sum(self.lines.values())

    def describe(self) -> str:
        rows = "\n".join(f"  {lines:5d}  {path}" for path, lines in self.lines.items())
        return f"{len(self.lines)} files, {self.total_lines} lines:\n{rows}"


@functools.cache
def function_spans(path: str) -> tuple[tuple[int, int, str], ...]:
    """(first line, last line, name) of every function and lambda of a file; a function's first line is that of
    its first decorator, as its code object's co_firstlineno."""
    spans = []
    for node in ast.walk(ast.parse(pathlib.Path(path).read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            first = min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])
            spans.append((first, node.end_lineno, getattr(node, "name", "<lambda>")))
    return tuple(spans)


def span_of(path: str, first_line: int) -> tuple[int, int] | None:
    """The lines of the function whose code starts at `first_line`, or of the innermost function holding that line
    (a comprehension or generator expression has a code object of its own); None at module level."""
    holding = [(first, last) for first, last, _ in function_spans(path) if first <= first_line <= last]
    return min(holding, key=lambda span: span[1] - span[0]) if holding else None


def project_file(filename: str) -> str | None:
    """The path of a file of the project relative to its root, or None for anything else."""
    path = pathlib.Path(filename)
    if not path.is_absolute() or ROOT not in path.parents or path.suffix != ".py":
        return None
    relative = path.relative_to(ROOT)
    return None if relative.parts[0] in SKIPPED_FOLDERS else str(relative)


def count_lines(code_objects: list) -> ReadingPath:
    """The reading path of the functions whose code objects ran, in the order they first ran."""
    spans: dict[str, set[int]] = {}
    for code in code_objects:
        path = project_file(code.co_filename)
        if path is None or code.co_name == "<module>":
            continue
        if "/" not in path:  # a script counts whole
            spans.setdefault(path, set()).update(range(1, len(pathlib.Path(ROOT / path).read_text().splitlines()) + 1))
            continue
        span = span_of(str(ROOT / path), code.co_firstlineno)
        if span is not None:  # a class body is not a function
            spans.setdefault(path, set()).update(range(span[0], span[1] + 1))
    return ReadingPath({path: len(lines) for path, lines in spans.items() if lines})


def measure(run: Callable[[], object]) -> tuple[object, ReadingPath]:
    """Call `run()` under a profiler; its result and the reading path it executed."""
    seen: dict = {}  # code object -> None, in the order of first call

    def profile(frame, event, arg):
        if event == "call":
            seen.setdefault(frame.f_code, None)

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        result = run()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return result, count_lines(list(seen))


def measure_script(script: str, argv: list[str]) -> tuple[object, ReadingPath]:
    """The exit status of `script`'s main(argv) and the reading path it executed."""
    module = importlib.import_module(pathlib.Path(script).stem)
    return measure(lambda: module.main(argv))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    status, path = measure_script(argv[0], argv[1:])
    print(f"{argv[0]} exited with {status}; its reading path: {path.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
