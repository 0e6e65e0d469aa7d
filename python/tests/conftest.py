"""Shared fixtures: the bundled tiny GPT-2 (assets/tiny-gpt2) with the demo corpus and queries,
the `infl` binary (INFL_BIN, or target/release/infl), and one CLI fit and score of them that
every parity test compares with."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "assets" / "tiny-gpt2"
CORPUS = ROOT / "assets" / "demo" / "corpus.jsonl"
QUERIES = ROOT / "assets" / "demo" / "queries.jsonl"
BIN = Path(os.environ.get("INFL_BIN", ROOT / "target" / "release" / "infl"))
# Small enough to run in seconds, with more than one window per long document.
FIT = ["--max-len", "32", "--fisher", "empirical"]
SCORE = ["--dense", "--per-layer", "--top-k", "5"]


def cli(*args: str) -> subprocess.CompletedProcess:
    """Runs `infl --quiet ARGS`, failing the test with its stderr when it fails."""
    p = subprocess.run([str(BIN), "--quiet", *map(str, args)], capture_output=True, text=True)
    assert p.returncode == 0, f"infl {args} failed:\n{p.stderr}"
    return p


@pytest.fixture(scope="session")
def cli_runs(tmp_path_factory):
    """A CLI fit and a CLI score on the tiny model: (factors dir, results dir)."""
    d = tmp_path_factory.mktemp("cli")
    factors, results = d / "factors", d / "results"
    cli("fit", "--model", MODEL, "--train", CORPUS, "--out", factors, *FIT)
    cli("score", "--model", MODEL, "--factors", factors, "--train", CORPUS,
        "--queries", QUERIES, "--out", results, *SCORE)
    return factors, results
