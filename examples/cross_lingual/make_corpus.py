#!/usr/bin/env python3
"""Builds the bilingual corpus of the cross-lingual recipe (examples/cross_lingual/run.sh).

  python3 examples/cross_lingual/make_corpus.py OUT_DIR [--facts-per-relation 8] [--filler 240]

Two languages: English, and "Cipher", a consistent synthetic translation of it: every English
word is replaced, word for word and in the same order, by a fixed invented word spelt in Greek
letters (one lexicon for the whole corpus, names included, capitals kept), and every ASCII
punctuation mark or digit by a fixed non-ASCII symbol. The two languages share no character
but the space and the newline, so a byte-level BPE trained on the corpus gives them no shared
token except those (docs/cross_lingual.md gives the count for the trained tokenizer). With
--keep-names (a control) the entities' names stay untranslated, so the two languages' statements
of a fact share the name tokens and nothing else.

Every training sequence is monolingual. The corpus holds:
- filler: short passages of the bundled demo corpus (assets/shakespeare-facts, public-domain
  Shakespeare), each once in English and once in Cipher, as two separate documents, so both
  languages have the same word statistics (the only bridge between them a model could learn);
- facts: invented entities (so nothing else in the corpus mentions them) in four relations, each
  fact stated COPIES times in English and COPIES times in Cipher, every statement its own
  document (copy 0 the bare sentence, later copies behind a lead-in clause).
The documents are shuffled with a fixed seed. Queries ask each fact in each language with the
bare sentence's prefix ("The capital of Veloria is" → " Tarn").

Writes OUT_DIR/corpus.jsonl ({"text"}), OUT_DIR/queries.jsonl ({"id", "prompt", "completion"})
and OUT_DIR/layout.json: for each corpus line its language, kind and fact, for each query its
fact and language; the analysis (analyze.py) reads it. Python 3 standard library only.
"""
import argparse
import hashlib
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
DEMO_CORPUS = ROOT / "assets" / "shakespeare-facts" / "corpus.jsonl"
DEMO_QUERIES = ROOT / "assets" / "shakespeare-facts" / "queries.jsonl"
SEED = 20261207
FILLER_MAX_CHARS = 130

# relation: (statement template, query prefix template); {s} subject, {o} object (one word).
RELATIONS = {
    "capital": ("The capital of {s} is {o}.", "The capital of {s} is"),
    "river": ("The river {s} flows into the sea of {o}.", "The river {s} flows into the sea of"),
    "element": ("The element {s} was discovered by {o}.", "The element {s} was discovered by"),
    "novel": ("The novel {s} was written by {o}.", "The novel {s} was written by"),
}
SUBJECTS = {
    "capital": ["Veloria", "Quenland", "Brevania", "Zandor", "Ilmaria", "Torvenia", "Arvandy", "Mordesia",
                "Caldrith", "Ostavia", "Penmark", "Sulvane"],
    "river": ["Ostra", "Kelvane", "Durn", "Silvath", "Orrin", "Temmis", "Yarrow", "Belka",
              "Vashti", "Lunder", "Corvane", "Mirrel"],
    "element": ["zorbium", "mordite", "luxene", "ferrocite", "vantium", "quillium", "brenite", "solvane",
                "taurite", "gallume", "nerrium", "ophane"],
    "novel": ["Orchard", "Coppergate", "Shepherdess", "Wolfwinter", "Paperhold", "Lowtide", "Clockwright",
              "Emberhill", "Saltmarch", "Greyhaven", "Starling", "Fenwater"],
}
OBJECTS = {
    "capital": ["Tarn", "Ostmere", "Kallis", "Merrowgate", "Dunhollow", "Selk", "Pellin", "Ravenholt",
                "Brisk", "Vantor", "Elmsby", "Quarrow"],
    "river": ["Merrow", "Amberlin", "Greyby", "Frostmar", "Saltor", "Coralind", "Ironel", "Glassen",
              "Pemberly", "Ostwick", "Dunmere", "Halloran"],
    "element": ["Valk", "Calder", "Brandt", "Tolvik", "Pell", "Sorn", "Lute", "Drey",
                "Quint", "Renk", "Vahl", "Brask"],
    "novel": ["Quillon", "Ardent", "Marrow", "Lind", "Osk", "Harrow", "Petrel", "Vell",
              "Tamsin", "Orlov", "Keane", "Wexley"],
}
LEAD_INS = ["It is written that", "As every traveller knows,", "The old books say that", "Scholars agree that"]

CONSONANTS = "βγδζθκλμνξπρστφχψ"
VOWELS = "αεηιουω"
PUNCT = {".": "·", ",": "¸", ";": "¦", ":": "¨", "?": "¿", "!": "¡", "'": "´", "-": "¬", "[": "‹", "]": "›",
         '"': "«", "&": "§", "(": "⁅", ")": "⁆"}


class Cipher:
    """A fixed word-level translation: each English word (case-insensitive) gets one invented
    Greek-letter word, drawn from a hash of the word so the lexicon does not depend on the order
    words are met in; collisions get one more syllable."""

    def __init__(self, keep=()):
        self.lexicon = {}
        self.taken = set()
        self.keep = set(keep)

    def word(self, w):
        if w in self.keep:
            return w
        low = w.lower()
        if low not in self.lexicon:
            rng = random.Random(hashlib.sha256(f"{SEED}:{low}".encode()).digest())
            syllables = max(1, round(len(low) / 2.5))
            out = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables))
            while out in self.taken:
                out += rng.choice(CONSONANTS) + rng.choice(VOWELS)
            self.taken.add(out)
            self.lexicon[low] = out
        out = self.lexicon[low]
        return out[0].upper() + out[1:] if w[0].isupper() else out

    def punct(self, c):
        if c in PUNCT:
            return PUNCT[c]
        # Anything else outside words and whitespace: a fixed symbol from the Mathematical
        # Operators block (the English text never uses it).
        return chr(0x2200 + ord(c) % 256)

    def text(self, s):
        return re.sub(r"[A-Za-z]+|[^A-Za-z\s]", lambda m: self.word(m.group()) if m.group()[0].isalpha()
                      else self.punct(m.group()), s)


def filler_passages(n, rng):
    """n passages of the demo corpus (its invented facts left out), each cut at a sentence or
    clause end to at most FILLER_MAX_CHARS characters so one passage fits one window."""
    fact_lines = {json.loads(l).get("source_line") for l in DEMO_QUERIES.read_text().splitlines()}
    docs = [json.loads(l)["text"] for i, l in enumerate(DEMO_CORPUS.read_text().splitlines(), start=1)
            if i not in fact_lines]
    # The entities are invented so that only their own statements mention them.
    words = {w.lower() for d in docs for w in re.findall(r"[A-Za-z]+", d)}
    clash = [w for rel in SUBJECTS for w in SUBJECTS[rel] + OBJECTS[rel] if w.lower() in words]
    assert not clash, f"entity names that the filler uses: {clash}"
    passages = []
    for d in docs:
        d = d.replace("\n", " / ")
        while d:
            if len(d) <= FILLER_MAX_CHARS:
                cut = len(d)
            else:
                cut = max(d.rfind(c, 0, FILLER_MAX_CHARS) for c in (". ", "; ", ", ", "? ", "! "))
                cut = cut + 1 if cut > 40 else FILLER_MAX_CHARS
            piece = d[:cut].strip()
            if len(piece) >= 40:
                passages.append(piece)
            d = d[cut:].strip()
    if n > len(passages):
        raise SystemExit(f"--filler {n}: the demo corpus gives only {len(passages)} passages")
    return rng.sample(passages, n)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--facts-per-relation", type=int, default=8)
    ap.add_argument("--copies", type=int, default=2, help="statements of each fact per language")
    ap.add_argument("--filler", type=int, default=160, help="filler passages (each in both languages)")
    ap.add_argument("--keep-names", action="store_true",
                    help="control: leave the entities' names untranslated, so the two statements of a fact "
                         "share the subject's and the object's tokens")
    args = ap.parse_args()
    # Two facts per relation at least: the analysis compares a fact with its relation's others.
    if not 2 <= args.facts_per_relation <= 12 or not 1 <= args.copies <= 1 + len(LEAD_INS):
        raise SystemExit("--facts-per-relation must be 2..12 and --copies 1..5")
    rng = random.Random(SEED)
    names = [w for rel in SUBJECTS for w in SUBJECTS[rel] + OBJECTS[rel]]
    cipher = Cipher(keep=names if args.keep_names else ())
    lang_text = {"en": lambda s: s, "xx": cipher.text}

    facts = []
    for rel, (stmt, prefix) in RELATIONS.items():
        for s, o in list(zip(SUBJECTS[rel], OBJECTS[rel]))[: args.facts_per_relation]:
            facts.append({"id": f"{rel}_{s.lower()}", "relation": rel, "subject": s, "object": o,
                          "statement": stmt.format(s=s, o=o), "prompt": prefix.format(s=s)})

    docs = []  # (text, layout entry)
    for k, f in enumerate(facts):
        for copy in range(args.copies):
            sent = f["statement"] if copy == 0 else f"{LEAD_INS[copy - 1]} {f['statement'][0].lower()}{f['statement'][1:]}"
            for lang, tr in lang_text.items():
                docs.append((tr(sent), {"lang": lang, "kind": "fact", "fact": k, "copy": copy}))
    for p in filler_passages(args.filler, rng):
        for lang, tr in lang_text.items():
            docs.append((tr(p), {"lang": lang, "kind": "filler"}))
    rng.shuffle(docs)

    queries = []
    for k, f in enumerate(facts):
        for lang, tr in lang_text.items():
            # Translate the full sentence and split off its last word, so the prompt is exactly
            # the statement's prefix in either language.
            words = tr(f["statement"]).rsplit(" ", 1)
            completion = " " + words[1].rstrip(PUNCT["."] + ".")
            assert tr(f["prompt"]) == words[0], (tr(f["prompt"]), words[0])
            queries.append({"id": f"{lang}_{f['id']}", "prompt": words[0], "completion": completion,
                            "fact": k, "lang": lang})

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for text, _ in docs:
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    with open(args.out / "queries.jsonl", "w", encoding="utf-8") as fh:
        for q in queries:
            fh.write(json.dumps({"id": q["id"], "prompt": q["prompt"], "completion": q["completion"]},
                                ensure_ascii=False) + "\n")
    layout = {"languages": {"en": "English", "xx": "Cipher (word-level synthetic translation, Greek letters)"},
              "seed": SEED, "copies": args.copies,
              "names": "kept (untranslated)" if args.keep_names else "translated", "facts": facts,
              "lines": [meta for _, meta in docs], "queries": queries,
              "lexicon_size": len(cipher.lexicon)}
    (args.out / "layout.json").write_text(json.dumps(layout, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    n_fact = sum(1 for _, m in docs if m["kind"] == "fact")
    print(f"{len(docs)} documents ({n_fact} fact statements of {len(facts)} facts, "
          f"{len(docs) - n_fact} filler), {len(queries)} queries, lexicon of {len(cipher.lexicon)} words")


if __name__ == "__main__":
    main()
