"""Files written so that a crash at any moment leaves either the old file or the new one, never half a file."""

import csv
import os
from collections.abc import Callable
from typing import IO


def write_atomically(path: str, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call `write(file)` on a temporary file next to `path`, flush it to disk, then rename it to `path`."""
    temporary = f"{path}.tmp"
    with open(temporary, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)  # atomic on POSIX and Windows


def write_text_atomically(path: str, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_atomically(path, lambda file: file.write(text))


def write_csv_atomically(path: str, rows: list) -> None:
    """Write `rows` (sequences of fields) to `path` as CSV, quoted where a field needs it, atomically."""
    write_atomically(path, lambda file: csv.writer(file, lineterminator="\n").writerows(rows))
