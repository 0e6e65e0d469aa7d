"""The directories the stages write, opened from Python: `Factors` (from `fit`) and `Results`
(from `score` and `self_influence`), whether Python or the command line wrote them. Results
come in Python's shapes: the dense scores as a numpy array memory-mapped from
`scores.safetensors` (never copied), the top/bottom-k as a list of dicts (a pandas DataFrame
when pandas is installed), self-influence as an array."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from . import _infl
from ._infl import InputError, MismatchError

PathLike = Union[str, "os.PathLike[str]"]


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None
    except ValueError as e:
        raise MismatchError(f"{path}: not valid JSON ({e})") from None


def _read_jsonl(path: Path) -> List[Dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise MismatchError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


class Factors:
    """A factors directory written by `infl.fit` or `infl fit`: factors.safetensors and
    meta.json (the options, the model and the corpus they were fitted on)."""

    def __init__(self, dir: PathLike):
        self.dir = Path(dir)
        if not (self.dir / "meta.json").exists():
            raise InputError(
                f"{self.dir}: no meta.json: not a finished factors directory "
                "(a sharded fit needs `infl merge`)"
            )

    @property
    def meta(self) -> Dict[str, Any]:
        """meta.json as a dict."""
        return _read_json(self.dir / "meta.json")

    def __fspath__(self) -> str:
        return str(self.dir)

    def __repr__(self) -> str:
        return f"Factors({str(self.dir)!r})"


class Results:
    """A results directory written by `infl.score`, `infl.self_influence` or the command line.

    - `top_k`: every line of top_k.jsonl as a dict (query_id, direction "top"/"bottom", rank,
      sequence_id, score, and text, per_layer, tokens when recorded); `top_k_frame()` as a
      pandas DataFrame.
    - `scores`: the dense [n_queries, n_train] float32 matrix (`score(dense=True)`),
      memory-mapped from scores.safetensors; `query_ids` its rows, `sequence_ids` its columns.
    - `self_influence`: each training sequence's self-influence (self_influence.jsonl) as an
      array, `self_influence_ids` their ids.
    - `layers`: layers.json (per-layer totals, with `per_layer=True`); `distribution`:
      distribution.json; `prefilter`: prefilter.json (`prefilter=N`); `stability`:
      stability.json (factors of `fit(seeds=K)`); `meta`: meta.json.
    """

    def __init__(self, dir: PathLike):
        self.dir = Path(dir)
        if not (self.dir / "meta.json").exists():
            raise InputError(
                f"{self.dir}: no meta.json: not a finished results directory "
                "(a sharded score needs `infl merge`)"
            )

    def __fspath__(self) -> str:
        return str(self.dir)

    def __repr__(self) -> str:
        return f"Results({str(self.dir)!r})"

    @property
    def meta(self) -> Dict[str, Any]:
        """meta.json as a dict."""
        return _read_json(self.dir / "meta.json")

    @property
    def top_k(self) -> List[Dict[str, Any]]:
        """The lines of top_k.jsonl, in file order (per query: top ranks, then bottom)."""
        return _read_jsonl(self.dir / "top_k.jsonl")

    def top(self, query_id: str, direction: str = "top") -> List[Dict[str, Any]]:
        """One query's top (most supportive) or bottom (most opposing) list, by rank."""
        rows = [
            r
            for r in self.top_k
            if r["query_id"] == query_id and r.get("direction", "top") == direction
        ]
        return sorted(rows, key=lambda r: r["rank"])

    def top_k_frame(self):
        """top_k.jsonl as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("top_k_frame() needs pandas: pip install pandas") from None
        return pd.DataFrame(self.top_k)

    def _dense_header(self) -> tuple:
        path = self.dir / "scores.safetensors"
        if not path.exists():
            raise InputError(f"{path}: not found: score with dense=True to keep the matrix")
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MismatchError(f"{path}: truncated header")
            (n,) = struct.unpack("<Q", head)
            if n > os.path.getsize(path) - 8:
                raise MismatchError(f"{path}: header length {n} past the end of the file")
            try:
                header = json.loads(f.read(n))
                t = header["scores"]
                rows, cols = (int(x) for x in t["shape"])
                start, end = (int(x) for x in t["data_offsets"])
            except (ValueError, KeyError, TypeError) as e:
                raise MismatchError(f"{path}: malformed safetensors header ({e})") from None
        if t.get("dtype") != "F32" or end - start != rows * cols * 4:
            raise MismatchError(f"{path}: expected F32 [{rows}, {cols}] scores")
        if 8 + n + end > os.path.getsize(path):
            raise MismatchError(f"{path}: shorter than its header says")
        return path, 8 + n + start, (rows, cols), header.get("__metadata__", {})

    @property
    def scores(self) -> np.ndarray:
        """The dense [n_queries, n_train] float32 scores, memory-mapped read-only from
        scores.safetensors (rows: `query_ids`; columns: `sequence_ids`, corpus order)."""
        path, offset, shape, _ = self._dense_header()
        return np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=shape)

    @property
    def query_ids(self) -> List[str]:
        """The queries' ids: the rows of `scores`, in query-file order."""
        return list(self.meta["queries"]["ids"])

    @property
    def sequence_ids(self) -> List[str]:
        """The training sequences' ids (`LINE:WINDOW`) in corpus order: the columns of `scores`.
        Read by cutting the recorded corpus into windows again (the corpus must still be at
        the path meta.json records, and its hash match)."""
        meta = self.meta
        corpus, model = meta["corpus"], meta["model"]
        ids = _infl.sequence_ids(model["path"], corpus["path"], int(corpus["max_len"]))
        if len(ids) != int(corpus["n_sequences"]):
            raise MismatchError(
                f"{corpus['path']}: holds {len(ids)} sequences, the results {corpus['n_sequences']}"
            )
        return ids

    @property
    def self_influence(self) -> np.ndarray:
        """Each training sequence's self-influence, in corpus order (self_influence.jsonl)."""
        rows = _read_jsonl(self.dir / "self_influence.jsonl")
        return np.array([r["self_influence"] for r in rows], dtype=np.float64)

    @property
    def self_influence_ids(self) -> List[str]:
        """The ids of `self_influence`'s entries."""
        return [r["sequence_id"] for r in _read_jsonl(self.dir / "self_influence.jsonl")]

    @property
    def layers(self) -> Optional[Dict[str, Any]]:
        """layers.json (per-layer totals over the corpus), or None without `per_layer`."""
        p = self.dir / "layers.json"
        return _read_json(p) if p.exists() else None

    @property
    def distribution(self) -> Optional[Dict[str, Any]]:
        """distribution.json (each query's score statistics and tails), or None."""
        p = self.dir / "distribution.json"
        return _read_json(p) if p.exists() else None

    @property
    def prefilter(self) -> Optional[Dict[str, Any]]:
        """prefilter.json (per query: the BM25 candidates' estimated recall of the exact top-k,
        with its interval, and the candidates used), or None without a sampled `prefilter`."""
        p = self.dir / "prefilter.json"
        return _read_json(p) if p.exists() else None

    @property
    def stability(self) -> Optional[Dict[str, Any]]:
        """stability.json (per query: the top-k's overlap across the fits of `fit(seeds=K)`,
        each top sequence's rank range and score spread), or None with one fit."""
        p = self.dir / "stability.json"
        return _read_json(p) if p.exists() else None

    def report(self, out: PathLike = "report.html", **options: Any) -> Path:
        """Writes this directory's HTML report (`infl.report`); returns its path."""
        from . import report

        return report(self, out=out, **options)
