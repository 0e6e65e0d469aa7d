#!/usr/bin/env python3
"""Measures how much of each query's influence crosses languages, per model size.

  python3 examples/cross_lingual/analyze.py OUT_DIR SIZE [SIZE ...]

Reads OUT_DIR/data/layout.json (from make_corpus.py) and, for each SIZE, OUT_DIR/SIZE/model
(training.json) and OUT_DIR/SIZE/results (meta.json and the dense scores.safetensors of
`infl score --dense`). A query asks fact f in language X; Y is the other language. Per query:

- learned: −log p(completion | prompt) in nats (summed over the completion's tokens) and p;
- share_pos / share_abs: the share of the query's positive influence (sum of max(score, 0) over
  the corpus), and of its |influence|, on f's statements in X (`own_lang`) and in Y
  (`other_lang`); `cross_fraction`: other_lang / (own_lang + other_lang) of the positive shares;
- baseline: the mean share_pos of another fact's statements in Y (all other facts, and other
  facts of the same relation, which share the statement's template); `lift`: other_lang's
  share_pos over the same-relation baseline (1 = no more than a statement of another fact; the
  summary's `lift_pooled`, the table's lift, is the ratio of the two means over queries);
- rank_other_lang: rank (1 = most positive) of f's best statement in Y among all training
  sequences, and among Y's fact statements only (`rank_other_lang_among_facts`);
- auc_*: the probability that a statement of f outscores a statement of another fact in the
  same language (own: X, other: Y; `auc_other_same_relation`: only other facts of f's relation);
  0.5 is chance.

Prints a table per size (means over queries, and by query language) and writes
OUT_DIR/summary.json. Python 3 standard library only.
"""
import argparse
import json
import math
import statistics
import struct
import sys
from array import array
from pathlib import Path


def read_scores(path):
    """The `scores` tensor of a safetensors file: (rows, n_columns, query_ids)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        t = header["scores"]
        if t["dtype"] != "F32":
            raise SystemExit(f"{path}: scores are {t['dtype']}, expected F32")
        q, m = t["shape"]
        begin, end = t["data_offsets"]
        fh.seek(8 + n + begin)
        data = array("f")
        data.frombytes(fh.read(end - begin))
    if sys.byteorder != "little":
        data.byteswap()
    ids = json.loads(header.get("__metadata__", {}).get("query_ids", "[]"))
    return [data[i * m:(i + 1) * m] for i in range(q)], m, ids


def n_params(cfg):
    d, v, t, layers = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"], cfg["n_layer"]
    inner = cfg.get("n_inner") or 4 * d
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d)
    return v * d + t * d + layers * block + 2 * d  # the LM head is tied to the embedding


def auc(pos, neg):
    """P(a score of `pos` > a score of `neg`), ties counted half."""
    if not pos or not neg:
        return None
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def share(values, lines, total):
    return sum(values[i] for i in lines) / total if total > 0 else 0.0


def measure_query(row, q, layout, by_fact_lang):
    f, x = q["fact"], q["lang"]
    y = next(lang for lang in layout["languages"] if lang != x)
    rel = layout["facts"][f]["relation"]
    pos = [max(s, 0.0) for s in row]
    ab = [abs(s) for s in row]
    tp, ta = sum(pos), sum(ab)
    own, other = by_fact_lang[(f, x)], by_fact_lang[(f, y)]
    others_y = [g for g in range(len(layout["facts"])) if g != f]
    same_rel_y = [g for g in others_y if layout["facts"][g]["relation"] == rel]
    base_all = statistics.fmean(share(pos, by_fact_lang[(g, y)], tp) for g in others_y)
    base_rel = statistics.fmean(share(pos, by_fact_lang[(g, y)], tp) for g in same_rel_y)
    s_own, s_other = share(pos, own, tp), share(pos, other, tp)
    best_other = max(row[i] for i in other)
    y_fact_lines = [i for g in others_y for i in by_fact_lang[(g, y)]]
    return {
        "share_pos": {"own_lang": s_own, "other_lang": s_other},
        "share_abs": {"own_lang": share(ab, own, ta), "other_lang": share(ab, other, ta)},
        "cross_fraction": s_other / (s_own + s_other) if s_own + s_other > 0 else None,
        "baseline_pos": {"other_facts": base_all, "other_facts_same_relation": base_rel},
        "lift": s_other / base_rel if base_rel > 0 else None,
        "rank_other_lang": 1 + sum(1 for s in row if s > best_other),
        "rank_other_lang_among_facts": 1 + sum(1 for i in y_fact_lines if row[i] > best_other),
        "auc_own": auc([row[i] for i in own], [row[i] for g in others_y for i in by_fact_lang[(g, x)]]),
        "auc_other": auc([row[i] for i in other], [row[i] for i in y_fact_lines]),
        "auc_other_same_relation": auc([row[i] for i in other],
                                       [row[i] for g in same_rel_y for i in by_fact_lang[(g, y)]]),
    }


def values_of(records, path):
    vals = []
    for r in records:
        v = r
        for k in path:
            v = v[k]
        if v is not None:
            vals.append(v)
    return vals


def mean_of(records, path):
    vals = values_of(records, path)
    return statistics.fmean(vals) if vals else None


def ci95(records, path):
    """Half-width of the normal 95% interval of the mean over queries (the two languages' queries
    of a fact are not independent, so read it as a rough scale)."""
    vals = values_of(records, path)
    return 1.96 * statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None


def group_means(records):
    m = {k: mean_of(records, p) for k, p in SUMMARY_FIELDS.items()}
    # A ratio of means: the mean of per-query ratios is dominated by the queries whose baseline
    # share is near zero.
    base = m["baseline_pos_same_relation"]
    m["lift_pooled"] = m["share_pos_other_lang"] / base if base else None
    m["median_rank_other_lang"] = statistics.median(values_of(records, ("rank_other_lang",)))
    for k in ("auc_other", "auc_other_same_relation"):
        m[k + "_ci95"] = ci95(records, SUMMARY_FIELDS[k])
    return m


SUMMARY_FIELDS = {
    "loss": ("loss",), "p_answer": ("p_answer",),
    "share_pos_own_lang": ("share_pos", "own_lang"), "share_pos_other_lang": ("share_pos", "other_lang"),
    "share_abs_own_lang": ("share_abs", "own_lang"), "share_abs_other_lang": ("share_abs", "other_lang"),
    "cross_fraction": ("cross_fraction",),
    "baseline_pos_other_facts": ("baseline_pos", "other_facts"),
    "baseline_pos_same_relation": ("baseline_pos", "other_facts_same_relation"),
    "lift": ("lift",), "rank_other_lang": ("rank_other_lang",),
    "rank_other_lang_among_facts": ("rank_other_lang_among_facts",),
    "auc_own": ("auc_own",), "auc_other": ("auc_other",), "auc_other_same_relation": ("auc_other_same_relation",),
}


def analyse_size(out, size, layout, by_fact_lang):
    model, results = out / size / "model", out / size / "results"
    training = json.loads((model / "training.json").read_text())
    meta = json.loads((results / "meta.json").read_text())
    rows, n_cols, ids = read_scores(results / "scores.safetensors")
    if n_cols != len(layout["lines"]):
        raise SystemExit(f"{results}: {n_cols} training sequences for {len(layout['lines'])} documents: a document "
                         "was cut into windows, so columns no longer map to lines (raise --n-positions)")
    losses = dict(zip(meta["queries"]["ids"], meta["queries"]["losses"]))
    per_query = []
    for q, row in zip(layout["queries"], rows):
        qid = f"{q['lang']}_{layout['facts'][q['fact']]['id']}"
        if ids and qid not in ids:
            raise SystemExit(f"{results}: query {qid} is not in the scores")
        r = {"query_id": qid, "lang": q["lang"], "loss": losses[qid], "p_answer": math.exp(-losses[qid])}
        r.update(measure_query(row, q, layout, by_fact_lang))
        per_query.append(r)
    groups = {"all": per_query}
    for lang in layout["languages"]:
        groups[f"asked_in_{lang}"] = [r for r in per_query if r["lang"] == lang]
    cfg = training["config"]
    return {
        "size": size,
        "config": {k: cfg[k] for k in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size")},
        "parameters": n_params(cfg),
        "epochs": training["options"]["epochs"],
        "final_train_loss": training["epoch_losses"][-1],
        "strategy": meta.get("strategy"),
        "names": layout.get("names", "translated"),
        "means": {g: group_means(rs) for g, rs in groups.items()},
        "queries": per_query,
    }


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(sizes, n_train):
    cols = [("loss", "−log p", ".2f"), ("p_answer", "p(ans)", ".3f"),
            ("share_pos_own_lang", "pos own", ".3f"), ("share_pos_other_lang", "pos other", ".4f"),
            ("baseline_pos_same_relation", "base rel", ".4f"), ("lift_pooled", "lift", ".2f"),
            ("share_abs_own_lang", "abs own", ".3f"), ("share_abs_other_lang", "abs other", ".4f"),
            ("cross_fraction", "cross", ".3f"), ("median_rank_other_lang", "rank oth", ".1f"),
            ("auc_own", "AUC own", ".3f"), ("auc_other", "AUC oth", ".3f"), ("auc_other_ci95", "±", ".3f"),
            ("auc_other_same_relation", "AUC oth rel", ".3f"), ("auc_other_same_relation_ci95", "±", ".3f")]
    for s in sizes:
        c = s["config"]
        print(f"size {s['size']}: n_embd {c['n_embd']}, {c['n_layer']} layers, {s['parameters']} parameters, "
              f"{s['epochs']} epochs, final training loss {s['final_train_loss']:.3f} nats/token, "
              f"names {s['names']}")
    print(f"means over queries ({n_train} training sequences; shares of each query's positive / |influence|)")
    print("(lift: pos other / base rel; rank oth: median; ±: 95% interval of the mean)")
    print(f"{'size':<6}{'params':>9} {'asked':<6}" + "".join(f"{h:>{8 if h == '±' else 11}}" for _, h, _ in cols))
    for s in sizes:
        for g, m in s["means"].items():
            label = "all" if g == "all" else g.removeprefix("asked_in_")
            print(f"{s['size']:<6}{s['parameters']:>9} {label:<6}" + "".join(f"{fmt(m[k], f):>{8 if h == '±' else 11}}" for k, h, f in cols))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("sizes", nargs="+")
    args = ap.parse_args()
    layout = json.loads((args.out / "data" / "layout.json").read_text(encoding="utf-8"))
    by_fact_lang = {}
    for i, m in enumerate(layout["lines"]):
        if m["kind"] == "fact":
            by_fact_lang.setdefault((m["fact"], m["lang"]), []).append(i)
    sizes = [analyse_size(args.out, s, layout, by_fact_lang) for s in args.sizes]
    print_table(sizes, len(layout["lines"]))
    summary = {
        "definition": __doc__.split("\n\n", 2)[2].rsplit("\n\nPrints", 1)[0],
        "corpus": {"documents": len(layout["lines"]), "facts": len(layout["facts"]), "copies": layout["copies"],
                   "languages": layout["languages"], "seed": layout["seed"]},
        "sizes": sizes,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"→ {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
