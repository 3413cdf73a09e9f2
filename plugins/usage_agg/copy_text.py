"""COPY into PostgreSQL with either driver, and when a block may go as it is.

Rows are streamed into the stage (or, for a day's first rows, straight into the
table) with ``COPY``. A block built from checked bytes goes unescaped in COPY's text
format (:func:`copy_text`) only when :func:`copy_safe_text` finds it reads back as
exactly the rows it was built from; the invariant lives here, beside the writes that
rely on it, so loosening a reader cannot corrupt a write. Anything else goes escaped
(:func:`copy_rows`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable


def copy_safe_text(block: bytes, rows: int, width: int) -> str | None:
    """``block`` as text if COPY's text format reads it as exactly ``rows`` rows of ``width`` fields, else ``None``."""
    if (
        block.count(b"\t") != (width - 1) * rows
        or block.count(b"\n") != rows
        or any(b in block for b in (b"\\", b"\r", b"\x00"))
    ):
        return None
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError:
        return None


def copy_text(cur, target: str, text: str) -> None:
    """``COPY`` a ready text-format block."""
    if hasattr(cur, "copy_expert"):  # psycopg2
        cur.copy_expert(f"COPY {target} FROM STDIN", io.StringIO(text))
    else:  # psycopg 3
        with cur.copy(f"COPY {target} FROM STDIN") as copy:
            copy.write(text)


def copy_rows(cur, target: str, rows: Iterable[tuple]) -> None:
    """``COPY target FROM STDIN`` with whichever driver the cursor belongs to, every field escaped."""
    if hasattr(cur, "copy_expert"):  # psycopg2: CSV, quoted, so any character in an id is safe
        buffer = io.StringIO()
        csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
        buffer.seek(0)
        cur.copy_expert(f"COPY {target} FROM STDIN WITH (FORMAT csv)", buffer)
    else:  # psycopg 3 escapes each row itself in COPY's text format
        with cur.copy(f"COPY {target} FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
