"""Python's fit and score write the same bytes as the command line's on the same inputs."""

import json

import infl
from conftest import CORPUS, MODEL, QUERIES


def meta_without_out(path):
    # The only field allowed to differ: where each run wrote (no field today; kept explicit).
    return json.loads(path.read_text())


def test_fit_and_score_match_the_cli_byte_for_byte(cli_runs, tmp_path):
    cli_factors, cli_results = cli_runs
    factors = infl.fit(MODEL, CORPUS, tmp_path / "factors", max_len=32, fisher="empirical",
                       progress=False)
    assert isinstance(factors, infl.Factors)
    assert (factors.dir / "factors.safetensors").read_bytes() == \
        (cli_factors / "factors.safetensors").read_bytes()
    assert factors.meta == infl.Factors(cli_factors).meta

    results = infl.score(MODEL, factors, CORPUS, QUERIES, tmp_path / "results", dense=True,
                         per_layer=True, top_k=5, progress=False)
    assert isinstance(results, infl.Results)
    for name in ["top_k.jsonl", "scores.safetensors", "layers.json", "distribution.json"]:
        assert (results.dir / name).read_bytes() == (cli_results / name).read_bytes(), name
    mine, theirs = results.meta, infl.Results(cli_results).meta
    mine.pop("factors", None), theirs.pop("factors", None)  # the factors' own directory
    assert mine == theirs


def test_a_corpus_in_memory_fits_the_same_factors_and_is_recorded(cli_runs, tmp_path):
    cli_factors, _ = cli_runs
    docs = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    factors = infl.fit(MODEL, iter(docs), tmp_path / "f", max_len=32, fisher="empirical",
                       progress=False)
    assert (factors.dir / "factors.safetensors").read_bytes() == \
        (cli_factors / "factors.safetensors").read_bytes()
    recorded = factors.dir.with_name(factors.dir.name + ".inputs") / "train.jsonl"
    assert [json.loads(x) for x in recorded.read_text().splitlines()] == docs
    # Plain strings are documents too.
    texts = [d["text"] for d in docs]
    again = infl.fit(MODEL, texts, tmp_path / "g", max_len=32, fisher="empirical",
                     progress=False)
    assert (again.dir / "factors.safetensors").read_bytes() == \
        (cli_factors / "factors.safetensors").read_bytes()


class FakeDataset:
    """What infl reads of a `datasets.Dataset`: iteration over rows as dicts."""

    column_names = ["text", "source"]

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)


def test_a_dataset_of_queries_scores_as_the_file_does(cli_runs, tmp_path):
    cli_factors, cli_results = cli_runs
    rows = [json.loads(line) for line in QUERIES.read_text().splitlines()]
    results = infl.score(MODEL, cli_factors, CORPUS, FakeDataset(rows), tmp_path / "r",
                         dense=True, per_layer=True, top_k=5, progress=False)
    assert (results.dir / "top_k.jsonl").read_bytes() == \
        (cli_results / "top_k.jsonl").read_bytes()
    assert (results.dir.with_name(results.dir.name + ".inputs") / "queries.jsonl").exists()
