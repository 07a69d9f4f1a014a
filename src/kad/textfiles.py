"""Reading the user's text files: UTF-8 text and JSON, with errors that name the line.

Light on purpose (no torch): the CLI and the eval tasks read prompts and data files through it.
"""

from __future__ import annotations

import codecs
import json
import os
import sys
from pathlib import Path
from typing import Any

from kad.errors import KadError

STDIN = "-"


def source_name(source: str | os.PathLike[str]) -> str:
    """How messages name ``source``: ``stdin`` for ``-``, else the path as given."""
    return "stdin" if source == STDIN else os.fspath(source)


def read_text(source: str | os.PathLike[str]) -> str:
    """The text of file ``source`` (the string ``-``: all of stdin), decoded as UTF-8 with a
    byte-order mark dropped and line ends kept; `KadError` for a file that cannot be read, or
    naming the line (and the byte in it) of the first bytes that are not UTF-8."""
    name = source_name(source)
    try:
        data = sys.stdin.buffer.read() if source == STDIN else Path(source).read_bytes()
    except FileNotFoundError:
        raise KadError(f"{name}: no such file") from None
    except OSError as err:
        raise KadError(f"cannot read {name}: {err.strerror}") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise KadError(
            f"{name} line {line} is not UTF-8 text: byte {data[err.start]:#04x} at byte {column} "
            "of the line (save the file as UTF-8)"
        ) from None


def parse_json(text: str, source: str | os.PathLike[str], line: int = 1) -> Any:
    """``text``, found at ``line`` of ``source`` (``-``: stdin), parsed as JSON; `KadError`
    naming the line (and column) where it stops being valid JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise KadError(
            f"{source_name(source)} line {line + err.lineno - 1} is not valid JSON "
            f"({err.msg}, column {err.colno})"
        ) from None
