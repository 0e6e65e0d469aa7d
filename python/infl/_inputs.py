"""Inputs given to the stages: a path is used as it is; data in memory (a list of strings, an
iterable of dicts, a `datasets.Dataset`) is written once as JSONL beside the output directory
(`OUT.inputs/NAME.jsonl`; the output directory itself holds only what infl writes), so the run
records the data it saw and a rerun resumes on the same bytes. Every kind of input goes through `input_path`: new kinds are added there."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Union

from ._infl import InputError

InputLike = Union[str, "os.PathLike[str]", Iterable[Any]]


def _jsonable(x: Any) -> Any:
    # numpy scalars and arrays (token ids from a datasets column) as plain numbers and lists.
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _line(item: Any, k: int, name: str, kind: str) -> str:
    if isinstance(item, str):
        if kind == "queries":
            raise InputError(
                f"{name} item {k}: a query is a dict with prompt and completion "
                "(or prompt_ids and completion_ids), not a string"
            )
        item = {"text": item}
    elif isinstance(item, Mapping):
        item = dict(item)
    else:
        raise InputError(
            f"{name} item {k}: expected a string or a dict, got {type(item).__name__}"
        )
    try:
        return json.dumps(item, ensure_ascii=False, default=_jsonable)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} item {k}: {e}") from None


def input_path(data: InputLike, out: Path, name: str, kind: str) -> Path:
    """The file holding `data`: a path as given, or data in memory written to
    `OUT.inputs/NAME.jsonl` beside the output directory (rewritten only when its bytes change).

    `kind` is "corpus" (strings are documents, `{"text": s}`) or "queries" (dicts only).
    A `datasets.Dataset` is read row by row as dicts, without importing `datasets`."""
    if isinstance(data, (str, os.PathLike)):
        return Path(data)
    if isinstance(data, (bytes, Mapping)) or not isinstance(data, Iterable):
        raise InputError(
            f"{name}: expected a path, a list of strings, an iterable of dicts or a "
            f"datasets.Dataset, got {type(data).__name__}"
        )
    text = "".join(_line(item, k, name, kind) + "\n" for k, item in enumerate(data))
    if not text:
        raise InputError(f"{name}: no items")
    path = Path(f"{os.fspath(out)}.inputs") / f"{name}.jsonl"
    payload = text.encode("utf-8")
    if path.exists() and path.read_bytes() == payload:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
    return path
