"""infl: which training sequences made a language model produce this completion?

EK-FAC influence functions (Grosse et al. 2023) with kronfluence's conventions, from the same
Rust library as the `infl` command line. Each stage of the command line is a function here,
with the same option names (`--max-len` is `max_len=`) and defaults, writing the same files:

    factors = infl.fit("model/", train="corpus.jsonl", out="factors")
    results = infl.score("model/", factors, train="corpus.jsonl",
                         queries="queries.jsonl", out="results", dense=True)
    results.top_k_frame()          # top and bottom sources per query (pandas)
    results.scores                 # [n_queries, n_train] numpy, memory-mapped
    results.report("report.html")

Directories written by either front end open with `infl.Factors(dir)` / `infl.Results(dir)`.
Corpora and queries may be paths or data in memory (a list of strings, an iterable of dicts,
a `datasets.Dataset`); data in memory is written to `OUT.inputs/NAME.jsonl` first.

Long runs release the GIL, show progress (tqdm when installed, else the command line's bars
on stderr) and stop on Ctrl-C with `KeyboardInterrupt` after saving their state: the same
call resumes. Errors raise one class per exit code of the command line: `InputError` (3;
`UsageError`, 2, for an option the parser refuses), `MismatchError` (4), `NonFiniteError` (5),
all `InflError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from . import _infl
from ._infl import InflError, InputError, MismatchError, NonFiniteError, UsageError
from ._inputs import InputLike, input_path
from ._results import Factors, Results

__all__ = [
    "fit",
    "score",
    "self_influence",
    "index",
    "inspect",
    "report",
    "Factors",
    "Results",
    "InflError",
    "InputError",
    "UsageError",
    "MismatchError",
    "NonFiniteError",
]
__version__ = _infl.__version__

PathLike = Union[str, "os.PathLike[str]"]
Progress = Union[bool, None, str, Callable[[str, int, int, bool], Any]]


def _argv(options: Dict[str, Any]) -> List[str]:
    """Keyword arguments as command-line flags: `max_len=7` is `--max-len 7`, `dense=True` is
    `--dense`, a list is comma-separated; None and False are left out (the default)."""
    argv: List[str] = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    return argv


class _Tqdm:
    """Progress reports drawn as tqdm bars, one per pass, in tokens (the eigendecompositions
    in layers)."""

    def __init__(self, tqdm: Any):
        self.tqdm, self.bar, self.stage = tqdm, None, None

    def __call__(self, stage: str, done: int, total: int, finished: bool) -> None:
        if self.bar is None or stage != self.stage:
            self.close()
            self.stage = stage
            unit = "layer" if stage == "eigendecompositions" else "tok"
            self.bar = self.tqdm(desc=stage, total=total or None, unit=unit, unit_scale=True)
        self.bar.update(done - self.bar.n)
        if finished:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _progress(progress: Progress) -> Any:
    """`True`: tqdm when importable, else the command line's bars; `False`/None: none; a
    callable `(stage, done, total, finished)` is called at every batch."""
    if progress is True:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return "bars"
        return _Tqdm(tqdm)
    return progress


def _run(native: Callable[..., Any], argv: List[str], progress: Progress, threads: Any) -> Any:
    sink = _progress(progress)
    try:
        return native(argv, sink, threads)
    finally:
        if isinstance(sink, _Tqdm):
            sink.close()


def fit(
    model: PathLike,
    train: InputLike,
    out: PathLike,
    *,
    engine: Optional[str] = None,
    device: Optional[str] = None,
    adapter: Optional[PathLike] = None,
    strategy: Optional[str] = None,
    fisher: Optional[str] = None,
    modules: Optional[str] = None,
    layers: Optional[Sequence[str]] = None,
    max_len: Optional[int] = None,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    seeds: Optional[int] = None,
    text_column: Optional[str] = None,
    tokens_column: Optional[str] = None,
    shard: Optional[str] = None,
    checkpoint_every: Optional[int] = None,
    fresh: bool = False,
    no_memory_check: bool = False,
    overwrite: bool = False,
    partition: Optional[str] = None,
    partitions: Optional[int] = None,
    memory_limit: Union[int, str, None] = None,
    store: bool = False,
    store_dtype: Optional[str] = None,
    store_form: Optional[str] = None,
    threads: Optional[int] = None,
    progress: Progress = True,
) -> Factors:
    out = Path(out)
    train = input_path(train, out, "train", "corpus")
    options = dict(locals())
    del options["threads"], options["progress"]
    finished = _run(_infl.fit, _argv(options), progress, threads)[1]
    # A shard's pass waits for `infl merge`: no factors to open yet.
    return Factors(out) if finished else out  # type: ignore[return-value]


def score(
    model: PathLike,
    factors: Union[PathLike, Factors],
    train: InputLike,
    queries: InputLike,
    out: PathLike,
    *,
    index: Optional[PathLike] = None,
    engine: Optional[str] = None,
    device: Optional[str] = None,
    adapter: Optional[PathLike] = None,
    damping: Union[str, float, None] = None,
    top_k: Optional[int] = None,
    dense: bool = False,
    batch_size: Optional[int] = None,
    max_len: Optional[int] = None,
    query_rank: Union[int, str, None] = None,
    per_layer: bool = False,
    per_token: bool = False,
    normalize: Optional[str] = None,
    prefilter: Optional[int] = None,
    prefilter_sample: Optional[int] = None,
    target_recall: Optional[float] = None,
    prefilter_max: Optional[int] = None,
    stable_overlap: Optional[float] = None,
    store: bool = False,
    parquet: bool = False,
    text_column: Optional[str] = None,
    tokens_column: Optional[str] = None,
    iterations: Optional[int] = None,
    refine_batch: Optional[int] = None,
    refine_tolerance: Optional[float] = None,
    refine_seed: Optional[int] = None,
    shard: Optional[str] = None,
    checkpoint_every: Optional[int] = None,
    fresh: bool = False,
    no_memory_check: bool = False,
    overwrite: bool = False,
    partition: Optional[str] = None,
    partitions: Optional[int] = None,
    memory_limit: Union[int, str, None] = None,
    threads: Optional[int] = None,
    progress: Progress = True,
) -> Results:
    out = Path(out)
    train = input_path(train, out, "train", "corpus")
    queries = input_path(queries, out, "queries", "queries")
    options = dict(locals())
    del options["threads"], options["progress"]
    _run(_infl.score, _argv(options), progress, threads)
    return Results(out) if (out / "meta.json").exists() else out  # type: ignore[return-value]


def self_influence(
    model: PathLike,
    factors: Union[PathLike, Factors],
    train: InputLike,
    out: PathLike,
    *,
    engine: Optional[str] = None,
    device: Optional[str] = None,
    adapter: Optional[PathLike] = None,
    damping: Union[str, float, None] = None,
    top_k: Optional[int] = None,
    batch_size: Optional[int] = None,
    max_len: Optional[int] = None,
    text_column: Optional[str] = None,
    tokens_column: Optional[str] = None,
    overwrite: bool = False,
    threads: Optional[int] = None,
    progress: Progress = True,
) -> Results:
    out = Path(out)
    train = input_path(train, out, "train", "corpus")
    options = dict(locals())
    del options["threads"], options["progress"]
    _run(_infl.self_influence, _argv(options), progress, threads)
    return Results(out)


def index(
    corpus: InputLike,
    model: PathLike,
    out: PathLike,
    *,
    max_len: Optional[int] = None,
    overwrite: bool = False,
) -> Path:
    out = Path(out)
    corpus = input_path(corpus, out, "corpus", "corpus")
    _infl.index(_argv(dict(locals())))
    return out


def inspect(
    model: PathLike,
    *,
    engine: Optional[str] = None,
    device: Optional[str] = None,
    adapter: Optional[PathLike] = None,
    batch_size: Optional[int] = None,
    max_len: Optional[int] = None,
    modules: Optional[str] = None,
    n_queries: Optional[int] = None,
    query_rank: Optional[str] = None,
    no_probe: bool = False,
    threads: Optional[int] = None,
) -> str:
    options = dict(locals())
    del options["threads"]
    return _infl.inspect(_argv(options), threads)


def report(
    results: Union[PathLike, Results],
    *,
    out: Optional[PathLike] = None,
    bootstrap: Optional[int] = None,
    seed: Optional[int] = None,
    max_tokens: Optional[int] = None,
) -> Path:
    _infl.report(_argv(dict(locals())))
    return Path(out if out is not None else "report.html")


_SUMMARIES = {
    fit: """Fit the curvature factors (A, S, eigenbases, Λ) of a model on a training corpus:
`infl fit`. Returns the `Factors` written to `out` (factors.safetensors, meta.json).

`train` is a JSONL path or data in memory (a list of strings, an iterable of dicts such as
{"text": ...} or {"ids": [...]}, a `datasets.Dataset`); data in memory is written to
`OUT.inputs/train.jsonl` first, so the run records it and a rerun resumes on it.""",
    score: """Score the influence of every training sequence on every query: `infl score`.
Returns the `Results` written to `out` (top_k.jsonl, meta.json, and scores.safetensors with
dense=True). `factors` is a `Factors` or its directory.

`train` and `queries` are JSONL paths or data in memory (queries as dicts: {"id": optional,
"prompt": ..., "completion": ...} or {"prompt_ids": [...], "completion_ids": [...]}), written
to `OUT.inputs/{train,queries}.jsonl` first. A score I(q, z) > 0 means training on z lowers
−log p(completion | prompt): z supports the completion.""",
    self_influence: """Each training sequence's influence on its own loss (outliers, mislabelled
data): `infl self-influence`. Returns the `Results` (`Results.self_influence` is the array).
`train` as for `fit` (data in memory goes to `OUT.inputs/train.jsonl`).""",
    index: """Build a BM25 index over a corpus's token ids for `score(prefilter=N, index=...)`:
`infl index`. Returns the index directory. A corpus in memory goes to `OUT.inputs/corpus.jsonl`.""",
    inspect: """Describe a model (architecture, parameters, tracked layers) and estimate the
memory and time fit and score will need: `infl inspect`. Returns the text it prints.""",
    report: """Write a self-contained HTML report of a results directory: `infl report`.
Returns the path written (`out`, default report.html).""",
}

_COMMON = """
Every option is the command line's: keyword `max_len` is `--max-len`, a flag (`--dense`) is
`True`, a list (`--layers a,b`) a list; left out, it takes the default shown. `threads` is
`--threads` (cores; set by the first job of the process), and `progress` is True (tqdm if
installed, else bars on stderr), False, or a callable (stage, done, total, finished) called
at every batch; Ctrl-C or an exception from it stops the job after its state is saved.

Options, as `infl {name} --help` shows them:

"""


def _document() -> None:
    for f, summary in _SUMMARIES.items():
        name = f.__name__
        help_text = _infl.options_help(name)
        options = help_text[help_text.find("Options:") :] if "Options:" in help_text else help_text
        f.__doc__ = summary + "\n" + _COMMON.format(name=name.replace("_", "-")) + options


_document()
