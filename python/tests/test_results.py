"""Results in Python's shapes, opened from a directory the command line wrote."""

import json

import numpy as np
import pytest

import infl
from conftest import QUERIES


def test_dense_scores_are_a_memory_map_with_the_right_shape_and_ids(cli_runs):
    _, cli_results = cli_runs
    r = infl.Results(str(cli_results))
    scores = r.scores
    assert isinstance(scores, np.memmap) and scores.dtype == np.float32
    query_ids = [json.loads(line)["id"] for line in QUERIES.read_text().splitlines()]
    assert r.query_ids == query_ids
    ids = r.sequence_ids
    assert scores.shape == (len(query_ids), len(ids)) == (8, r.meta["corpus"]["n_sequences"])
    assert len(set(ids)) == len(ids) and ids[0] == "1:0"
    # Every top-k entry is its cell of the matrix.
    for row in r.top_k:
        q, k = query_ids.index(row["query_id"]), ids.index(row["sequence_id"])
        assert scores[q, k] == pytest.approx(row["score"], rel=1e-5, abs=1e-6)
    # The mapping is read-only: results are never changed through it.
    with pytest.raises(ValueError):
        scores[0, 0] = 1.0


def test_top_k_as_dicts_and_as_a_frame(cli_runs):
    r = infl.Results(cli_runs[1])
    top = r.top("capital_veloria")
    assert [t["rank"] for t in top] == [1, 2, 3, 4, 5]
    assert top[0]["score"] >= top[-1]["score"]
    assert len(top[0]["per_layer"]) == len(r.layers["layers"])
    bottom = r.top("capital_veloria", "bottom")
    assert bottom[0]["score"] <= top[-1]["score"]
    pd = pytest.importorskip("pandas")
    frame = r.top_k_frame()
    assert isinstance(frame, pd.DataFrame) and len(frame) == len(r.top_k) == 8 * 5 * 2
    assert {"query_id", "direction", "rank", "sequence_id", "score"} <= set(frame.columns)


def test_self_influence_is_an_array_over_the_corpus(cli_runs, tmp_path):
    factors, results = cli_runs
    from conftest import CORPUS, MODEL

    r = infl.self_influence(MODEL, factors, CORPUS, tmp_path / "self", progress=False)
    values = r.self_influence
    assert values.shape == (infl.Results(results).meta["corpus"]["n_sequences"],)
    assert np.isfinite(values).all() and (values > 0).any()
    assert r.self_influence_ids[:2] == ["1:0", "2:0"]


def test_per_token_parts_are_listed_with_each_top_entry(cli_runs, tmp_path):
    from conftest import CORPUS, MODEL

    r = infl.score(MODEL, cli_runs[0], CORPUS, QUERIES, tmp_path / "tok", top_k=2,
                   per_token=True, progress=False)
    entry = r.top_k[0]
    assert entry["tokens"] and sum(t["score"] for t in entry["tokens"]) == \
        pytest.approx(entry["score"], rel=1e-3, abs=1e-4)


def test_prefilter_and_stability_are_read_from_their_files(cli_runs, tmp_path):
    """`prefilter` and `stability` hold what the command wrote (None when it wrote none), for
    a pre-filtered score and a score of `fit(seeds=2)`'s factors."""
    from conftest import CORPUS, MODEL

    index = infl.index(CORPUS, MODEL, tmp_path / "index", max_len=32)
    factors = infl.fit(MODEL, CORPUS, tmp_path / "f", max_len=32, seeds=2, progress=False)
    r = infl.score(MODEL, factors, CORPUS, QUERIES, tmp_path / "r", top_k=3, prefilter=40,
                   index=index, progress=False)
    on_disk = json.loads((tmp_path / "r" / "prefilter.json").read_text())
    assert r.prefilter == on_disk and len(r.prefilter["queries"]) == 8
    assert all(q["candidates"] == 40 and 0 <= q["recall"] <= 1 for q in r.prefilter["queries"])
    assert r.stability == json.loads((tmp_path / "r" / "stability.json").read_text())
    assert r.stability["seeds"] == [0, 1] and len(r.stability["queries"]) == 8
    assert all(0 <= q["overlap"] <= 1 for q in r.stability["queries"])
    plain = infl.Results(cli_runs[1])
    assert plain.prefilter is None and plain.stability is None
