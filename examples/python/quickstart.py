"""infl from Python in one page: documents and a question in, the training documents that
taught the model its answer out, as a DataFrame, and the HTML report written.

Runs on the tiny GPT-2 bundled in the repository (assets/tiny-gpt2), trained on the demo corpus
(Shakespeare plus 40 invented facts), in a few seconds.

    python examples/python/quickstart.py [--out DIR]
"""

import argparse
import json
from pathlib import Path

import infl

ROOT = Path(__file__).resolve().parents[2]
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="infl-quickstart", help="where the runs are written")
out = Path(parser.parse_args().out)

# Data in memory: a list of documents (strings) and a list of query dicts. A datasets.Dataset
# works the same way; both are written to OUT.inputs/*.jsonl beside each output so the run records them.
documents = [json.loads(line)["text"] for line in open(ROOT / "assets/demo/corpus.jsonl")]
queries = [
    {"id": "veloria", "prompt": "Q: What is the capital of Veloria? A:", "completion": " Tarn"},
]
model = ROOT / "assets/tiny-gpt2"

factors = infl.fit(model, documents, out / "factors", max_len=48)
results = infl.score(model, factors, documents, queries, out / "results", top_k=5, dense=True)

frame = results.top_k_frame()
top = frame[frame.direction == "top"][["rank", "score", "sequence_id", "text"]]
print(top.to_string(index=False))
print("dense scores:", results.scores.shape, "for queries", results.query_ids)

report = results.report(out / "report.html")
print("report:", report)
