"""Text inputs -> list[str] (the item type of the text modality)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pairfree.media._common import MediaError, missing_extra

TEXT_EXTENSIONS = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")
_DEFAULT_COLUMNS = ("text", "caption", "captions", "sentence", "prompt")


def _clean(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    s = str(v).strip()
    return s or None


def _pick_column(columns: list[str], column: str | None, where: str) -> str:
    if column is not None:
        if column not in columns:
            raise MediaError(f"{where}: no column {column!r}; available columns: {columns}")
        return column
    if len(columns) == 1:
        return columns[0]
    for c in _DEFAULT_COLUMNS:
        if c in columns:
            return c
    raise MediaError(f"{where}: which column holds the texts? pass column= (--column); available columns: {columns}")


def read_texts(path: str | Path, column: str | None = None) -> tuple[list[str], list[tuple[int, str]]]:
    """(texts, bad lines) of a text file, in file order, stripped, blank / missing entries skipped.

    Bad lines are (1-based line number, reason) for `.txt` lines that are not UTF-8 and `.jsonl`
    lines that are not JSON or lack the column; the other lines are still read. Problems with the
    whole file (missing, unreadable table, no such column, unknown format) raise `MediaError`.
    `.txt`: one text per line. `.csv` / `.tsv` / `.jsonl` / `.parquet`: the `column` field; when not
    given, the only column, else the first of text / caption / captions / sentence / prompt.
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise MediaError(f"{where}: no such file")
    ext = path.suffix.lower()
    texts: list[str] = []
    bad: list[tuple[int, str]] = []
    if ext in (".txt", "", ".jsonl"):
        data = path.read_bytes()
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        for lineno, raw in enumerate(data.split(b"\n"), 1):
            try:
                line = raw.decode("utf-8").rstrip("\r")
            except UnicodeDecodeError as e:
                bad.append((lineno, f"not UTF-8 text ({e.reason} at byte {e.start})"))
                continue
            if ext != ".jsonl":
                value = line
            else:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    bad.append((lineno, f"not JSON ({e.msg} at column {e.colno})"))
                    continue
                if isinstance(obj, dict):
                    try:
                        value = obj[_pick_column(list(obj), column, f"{where} line {lineno}")]
                    except MediaError as e:
                        bad.append((lineno, str(e).split(": ", 1)[-1]))
                        continue
                elif isinstance(obj, str):
                    value = obj
                else:
                    bad.append((lineno, f"a JSON {type(obj).__name__}, expected an object or a string"))
                    continue
            text = _clean(value)
            if text is not None:
                texts.append(text)
    elif ext in (".csv", ".tsv", ".parquet"):
        try:
            import pandas as pd
        except ImportError as e:
            raise missing_extra("pandas", f"reading {ext} texts") from e
        try:
            if ext == ".parquet":
                try:
                    import pyarrow.parquet as pq
                except ImportError as e:
                    raise missing_extra("pyarrow", "reading .parquet texts") from e
                columns = list(pq.read_schema(path).names)
                col = _pick_column(columns, column, where)
                values = pq.read_table(path, columns=[col]).column(col).to_pylist()
            else:
                df = pd.read_csv(path, sep="\t" if ext == ".tsv" else ",", dtype=str, keep_default_na=False)
                col = _pick_column(list(df.columns), column, where)
                values = df[col].tolist()
        except (MediaError, ImportError):
            raise
        except pd.errors.EmptyDataError:
            values = []
        except Exception as e:
            raise MediaError(f"{where}: cannot read the table ({type(e).__name__}: {e})") from e
        texts = [t for t in map(_clean, values) if t is not None]
    else:
        raise MediaError(f"{where}: unknown text format {ext!r}; expected one of {TEXT_EXTENSIONS}")
    return texts, bad


def load_texts(path: str | Path, column: str | None = None) -> list[str]:
    """Texts from a file (see `read_texts`), all or nothing: a bad line or no texts raise `MediaError`."""
    texts, bad = read_texts(path, column)
    if bad:
        lineno, reason = bad[0]
        more = f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
        raise MediaError(f"{path}: line {lineno} is {reason}{more}")
    if not texts:
        raise MediaError(f"no texts in {path}")
    return texts
