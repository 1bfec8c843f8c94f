"""Text inputs -> list[str] (the item type of the text modality)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pairfree.media._common import MediaError, missing_extra

TEXT_EXTENSIONS = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")
_DEFAULT_COLUMNS = ("text", "caption", "captions", "sentence", "prompt")


def _clean(values: list[Any]) -> list[str]:
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        s = str(v).strip()
        if s:
            out.append(s)
    return out


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


def load_texts(path: str | Path, column: str | None = None) -> list[str]:
    """Texts from a file, in file order, stripped, blank / missing entries skipped.

    `.txt`: one text per line. `.csv` / `.tsv` / `.jsonl` / `.parquet`: the `column` field; when not
    given, the only column, else the first of text / caption / captions / sentence / prompt.
    A missing column raises `MediaError` listing the available ones; no texts -> "no texts in <file>".
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise MediaError(f"{where}: no such file")
    ext = path.suffix.lower()
    if ext == ".txt" or ext == "":
        try:
            raw = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise MediaError(f"{where}: not UTF-8 text ({e})") from e
        texts = _clean(raw.splitlines())
    elif ext == ".jsonl":
        values = []
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MediaError(f"{where}: line {lineno} is not JSON ({e})") from e
                if isinstance(obj, str):
                    values.append(obj)
                    continue
                if not isinstance(obj, dict):
                    raise MediaError(f"{where}: line {lineno} is a JSON {type(obj).__name__}, expected an object or a string")
                key = _pick_column(list(obj), column, f"{where} line {lineno}")
                values.append(obj[key])
        texts = _clean(values)
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
                sep = "\t" if ext == ".tsv" else ","
                df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
                col = _pick_column(list(df.columns), column, where)
                values = df[col].tolist()
        except MediaError:
            raise
        except pd.errors.EmptyDataError:
            values = []
        except Exception as e:
            raise MediaError(f"{where}: cannot read the table ({type(e).__name__}: {e})") from e
        texts = _clean(values)
    else:
        raise MediaError(f"{where}: unknown text format {ext!r}; expected one of {TEXT_EXTENSIONS}")
    if not texts:
        raise MediaError(f"no texts in {where}")
    return texts
