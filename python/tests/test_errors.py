"""Each kind of bad input raises the exception class of the command line's exit code, with
the command line's message."""

import json
import shutil
import struct
import subprocess

import numpy as np
import pytest

import infl
from conftest import BIN, CORPUS, MODEL, QUERIES


def cli_error(*args):
    p = subprocess.run([str(BIN), "--quiet", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stderr.strip().removeprefix("error: ")


def test_a_malformed_corpus_line_is_an_input_error_with_the_cli_message(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txet": "misspelt"}\n')
    with pytest.raises(infl.InputError) as e:
        infl.fit(MODEL, bad, tmp_path / "f", max_len=32, progress=False)
    code, message = cli_error("fit", "--model", MODEL, "--train", bad, "--out", tmp_path / "g",
                              "--max-len", "32")
    assert code == 3 and str(e.value) == message
    assert "bad.jsonl" in message and "2" in message


def test_an_option_the_parser_refuses_is_a_usage_error(tmp_path):
    with pytest.raises(infl.UsageError, match="strategy"):
        infl.fit(MODEL, CORPUS, tmp_path / "f", strategy="exact", progress=False)
    with pytest.raises(infl.UsageError, match="query-rank"):
        infl.score(MODEL, tmp_path, CORPUS, QUERIES, tmp_path / "r", query_rank=0,
                   progress=False)
    assert issubclass(infl.UsageError, infl.InputError)


def test_queries_as_plain_strings_are_an_input_error(tmp_path):
    with pytest.raises(infl.InputError, match="item 0: a query is a dict"):
        infl.score(MODEL, tmp_path, CORPUS, ["what?"], tmp_path / "r", progress=False)


def test_factors_of_another_model_are_a_mismatch(cli_runs, tmp_path):
    factors, _ = cli_runs
    other = tmp_path / "other"
    shutil.copytree(MODEL, other)
    # The same architecture with one weight changed: another model.
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n + 4 : 8 + n + 8] = struct.pack("<f", 0.125)
    weights.write_bytes(bytes(data))
    with pytest.raises(infl.MismatchError) as e:
        infl.score(other, factors, CORPUS, QUERIES, tmp_path / "r", progress=False)
    code, message = cli_error("score", "--model", other, "--factors", factors, "--train", CORPUS,
                              "--queries", QUERIES, "--out", tmp_path / "s")
    assert code == 4 and str(e.value) == message


def test_a_model_that_computes_nan_is_a_non_finite_error(tmp_path):
    broken = tmp_path / "nan-model"
    shutil.copytree(MODEL, broken)
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    # Every weight NaN: the first loss is NaN.
    for name, t in header.items():
        if name != "__metadata__" and t["dtype"] == "F32":
            a, b = t["data_offsets"]
            data[8 + n + a : 8 + n + b] = np.full((b - a) // 4, np.nan, "<f4").tobytes()
    weights.write_bytes(bytes(data))
    with pytest.raises(infl.NonFiniteError):
        infl.fit(broken, CORPUS, tmp_path / "f", max_len=32, progress=False)


def test_a_missing_results_directory_is_an_input_error(tmp_path):
    with pytest.raises(infl.InputError, match="meta.json"):
        infl.Results(tmp_path / "nothing")


def test_a_missing_corpus_and_an_option_out_of_range_raise_the_cli_classes(tmp_path):
    missing = tmp_path / "no-such-corpus.jsonl"
    with pytest.raises(infl.InputError) as e:
        infl.fit(MODEL, missing, tmp_path / "f", max_len=32, progress=False)
    code, message = cli_error("fit", "--model", MODEL, "--train", missing, "--out", tmp_path / "g",
                              "--max-len", "32")
    assert code == 3 and "no-such-corpus.jsonl" in str(e.value)
    with pytest.raises(infl.UsageError, match="max-len"):
        infl.fit(MODEL, missing, tmp_path / "h", max_len=1, progress=False)
    assert cli_error("fit", "--model", MODEL, "--train", missing, "--out", tmp_path / "i",
                     "--max-len", "1")[0] == 2
