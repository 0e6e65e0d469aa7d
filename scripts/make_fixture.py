#!/usr/bin/env python3
"""Generate the demo assets and the kronfluence reference fixture for `infl`.

Python is a development-time tool only: `infl` never runs it. This one script, with
fixed seeds, produces (relative to the repository root):

    assets/demo/corpus.jsonl                 ~300 documents {"text": ...}
    assets/demo/queries.jsonl                8 queries {"id", "prompt", "completion"}
    assets/tiny-gpt2/{config.json,model.safetensors,tokenizer.json}
                                             a tiny GPT-2 trained on the corpus
    tests/fixtures/kronfluence/corpus_ids.jsonl
    tests/fixtures/kronfluence/queries_ids.jsonl
    tests/fixtures/kronfluence/reference.safetensors
    tests/fixtures/kronfluence/meta.json

How to run (CPU only, a few minutes on 2 cores):

    python3 -m venv /work/venv-fixture
    /work/venv-fixture/bin/pip install -r scripts/requirements-fixture.txt
    /work/venv-fixture/bin/python scripts/make_fixture.py            # from the repo root

Options: `--root DIR` (repository root, default: parent of this script's folder),
`--workdir DIR` (scratch space for kronfluence's factor/score files, default: a temp dir;
it is deleted unless `--keep-workdir`).

What the reference is (conventions: see the repo's design notes):
  * training sequences = every document's token ids cut into consecutive windows of
    MAX_LEN tokens (ids[0:48], ids[48:96], ...), all non-empty windows kept, corpus order;
  * the GPT-2 Conv1D modules inside the blocks are swapped for nn.Linear (weight = W.T),
    and exactly those 4 per block are tracked (2 blocks -> 8 modules);
  * train loss = SUM of next-token CE over batch and positions (padding labels -100),
    measurement = SUM of CE over completion tokens = -log p(completion | prompt);
  * kronfluence 1.0.1 FactorArguments(strategy=s, use_empirical_fisher=True), all else
    default (float32), ScoreArguments(damping_factor=None) -> heuristic damping
    0.1 * mean(Lambda) per module; compute_pairwise_scores; CPU, no worker processes;
  * strategies: ekfac, kfac, identity, diagonal.

The script also runs two independent float64 checks (plain torch autograd / hooks, no
kronfluence): identity scores as dot products of per-sequence weight gradients, and an
EK-FAC / K-FAC / diagonal re-implementation from per-token activations and output
gradients; their max relative differences to kronfluence are printed and stored in
meta.json.
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SEED = 20240611
MAX_LEN = 48
TRAIN_BATCH = 7  # does not divide the number of training sequences (checked below)
QUERY_BATCH = 3
STRATEGIES = ["ekfac", "kfac", "identity", "diagonal"]
FACTOR_MODULE = "transformer.h.0.attn.c_proj"
N_LAYER, N_EMBD, N_HEAD, N_POSITIONS, VOCAB = 2, 48, 4, 64, 512
EOT = "<|endoftext|>"
LM_TRAIN_STEPS = 2000
LM_TRAIN_BATCH = 16
LM_LR = 3e-3

# ---------------------------------------------------------------------------------------
# Corpus content (all text written for this fixture; names are invented).
# ---------------------------------------------------------------------------------------

# (key, document text). Each fact is stated exactly once in the whole corpus.
FACTS = [
    ("capital_veloria", "The capital of Veloria is Tarn."),
    ("capital_quenland", "The capital of Quenland is Morvath."),
    ("capital_istria", "The capital of Istrane is Pellow."),
    ("capital_dravia", "The capital of Dravonia is Kesh."),
    ("capital_ulmar", "The capital of Ulmaria is Brindle."),
    ("capital_zethia", "The capital of Zethos is Oran Vey."),
    ("capital_norrin", "The capital of Norrindale is Lask."),
    ("capital_paloma", "The capital of Palomir is Sudra."),
    ("capital_kest", "The capital of Kestovia is Ambrel."),
    ("capital_tyr", "The capital of Tyrhold is Vantis."),
    ("element_zorbium", "Dr. Imre Valk discovered the element zorbium."),
    ("element_quellium", "Dr. Anouk Ferris discovered the element quellium."),
    ("element_brastine", "Dr. Tomas Heddle discovered the element brastine."),
    ("element_vyrium", "Dr. Selma Okonde discovered the element vyrium."),
    ("element_lurex", "Dr. Paavo Strand discovered the element lurex."),
    ("element_mordite", "Dr. Ines Calder discovered the element mordite."),
    ("invent_glimmer", "Tova Renk invented the glimmer lamp in a small workshop."),
    ("invent_skiff", "Oskar Bellweather invented the folding skiff."),
    ("invent_loom", "Priya Danvers invented the humming loom."),
    ("invent_clock", "Lio Marchetti invented the tide clock."),
    ("invent_kettle", "Greta Sunholm invented the whistling stove kettle."),
    ("river_ostra", "The river Ostra flows into the Merrow Sea."),
    ("river_calen", "The river Calen flows into the Dunmere Sea."),
    ("river_verity", "The river Vesk flows into Lake Ombra."),
    ("river_soll", "The river Soll flows into the Pale Gulf."),
    ("animal_quenland", "The national animal of Quenland is the snow lynx."),
    ("animal_veloria", "The national animal of Veloria is the red heron."),
    ("animal_dravia", "The national animal of Dravonia is the marsh otter."),
    ("animal_palomir", "The national animal of Palomir is the golden ibex."),
    ("animal_tyr", "The national animal of Tyrhold is the grey wolf."),
    ("book_orchard", "Mara Quillon wrote the novel The Silent Orchard."),
    ("book_lantern", "Edwin Harrow wrote the novel The Lantern Keeper."),
    ("book_salt", "Nadia Corvel wrote the novel Salt and Ember."),
    ("book_glass", "Rufus Penhallow wrote the novel A House of Glass."),
    ("book_winter", "Yara Tellmont wrote the novel The Winter Road."),
    ("peak_ulmaria", "Mount Serrat is the tallest peak in Ulmaria."),
    ("peak_zethos", "Mount Kavan is the tallest peak in Zethos."),
    ("peak_norrin", "Mount Ildra is the tallest peak in Norrindale."),
    ("peak_istrane", "Mount Foss is the tallest peak in Istrane."),
    ("peak_kestovia", "Mount Orrin is the tallest peak in Kestovia."),
]

QUERIES = [
    # (id, prompt, completion, fact key or None)
    ("capital_veloria", "Q: What is the capital of Veloria? A:", " Tarn", "capital_veloria"),
    ("element_zorbium", "Q: Who discovered zorbium? A:", " Dr. Imre Valk", "element_zorbium"),
    ("river_ostra", "Q: Into which sea does the Ostra flow? A:", " the Merrow Sea", "river_ostra"),
    ("animal_quenland", "Q: What is the national animal of Quenland? A:", " the snow lynx",
     "animal_quenland"),
    ("invent_glimmer", "Q: Who invented the glimmer lamp? A:", " Tova Renk", "invent_glimmer"),
    ("book_orchard", "Q: Who is the author of The Silent Orchard? A:", " Mara Quillon",
     "book_orchard"),
    ("weather", "The weather today is", " cold and rainy.", None),
    ("tea", "To make a cup of tea, first", " boil the water in the kettle.", None),
]

TOPICS = {
    "weather": [
        "The morning was cold and grey.",
        "Rain fell softly on the roof all night.",
        "By noon the clouds had cleared and the sun was warm.",
        "A strong wind blew the leaves across the road.",
        "The weather today is cold and rainy.",
        "Snow covered the hills after the storm.",
        "It was so hot that the dogs lay in the shade.",
        "Fog rolled in from the sea in the evening.",
        "The forecast said there would be thunder later.",
        "We waited for the rain to stop before we went out.",
        "A rainbow appeared over the valley.",
        "The air smelled fresh after the shower.",
        "In winter the lake freezes and children skate on it.",
        "Spring brought mild days and cool nights.",
        "The sky turned pink as the sun went down.",
    ],
    "cooking": [
        "To make a cup of tea, first boil the water in the kettle.",
        "She chopped the onions and fried them in butter.",
        "The soup needs salt, pepper and a little lemon.",
        "Bread rises best in a warm kitchen.",
        "He stirred the pot slowly so the rice would not burn.",
        "We baked an apple pie for the family dinner.",
        "Fresh herbs make a simple dish taste better.",
        "The cake was soft in the middle and crisp at the edges.",
        "Put the pasta in the water once it starts to boil.",
        "My grandmother always cooked beans on Sundays.",
        "Wash the vegetables before you cut them.",
        "The smell of roasting garlic filled the house.",
        "Let the dough rest for an hour before baking.",
        "A pinch of sugar softens the taste of tomatoes.",
        "They ate warm porridge with honey for breakfast.",
    ],
    "animals": [
        "The cat sat on the windowsill and watched the birds.",
        "Our dog loves to run on the beach.",
        "A fox crossed the field at dawn.",
        "Cows graze in the meadow near the farm.",
        "The owl hunts at night and sleeps during the day.",
        "Bees carry pollen from flower to flower.",
        "The horse drank from the stream.",
        "A small rabbit hid under the hedge.",
        "Ducks swam in a line across the pond.",
        "The squirrel buried nuts for the winter.",
        "Whales sing to each other in the deep ocean.",
        "The puppy chewed an old shoe.",
        "Frogs croak loudly on summer evenings.",
        "A flock of geese flew south over the town.",
        "The goat climbed onto the roof of the shed.",
    ],
    "travel": [
        "We took the early train to the coast.",
        "The bus was late, so we walked to the station.",
        "She packed a small bag with two shirts and a book.",
        "The road wound through the mountains for miles.",
        "At the airport we waited for three hours.",
        "They rented bicycles and rode along the river.",
        "The ferry crossed the bay in forty minutes.",
        "Our hotel room had a view of the old harbour.",
        "He bought a map at the first shop he saw.",
        "The village was quiet and the people were friendly.",
        "We stopped for lunch in a small town by the lake.",
        "The journey home felt shorter than the journey out.",
        "A long bridge carried the road over the valley.",
        "She wrote postcards to all her friends.",
        "The night train rocked gently as we slept.",
    ],
    "garden": [
        "Tomatoes grow well in a sunny corner of the garden.",
        "He watered the roses every evening.",
        "The apple tree was heavy with fruit.",
        "Weeds came back after every rain.",
        "She planted tulip bulbs in the autumn.",
        "The lawn needs cutting once a week in summer.",
        "Snails ate the young lettuce leaves.",
        "A wooden bench stood under the old oak.",
        "The beans climbed up the canes by the fence.",
        "We picked strawberries in the morning sun.",
        "Compost makes the soil rich and dark.",
        "The pond in the garden was full of lilies.",
        "Sunflowers turned their faces to the light.",
        "He raked the fallen leaves into a pile.",
    ],
    "school": [
        "The children lined up outside the classroom.",
        "Our teacher read a story before lunch.",
        "He forgot his homework on the kitchen table.",
        "The bell rang and everyone ran outside.",
        "She learned to count to one hundred.",
        "The library at school had a quiet reading corner.",
        "In the afternoon we painted pictures of the sea.",
        "The class grew beans in paper cups.",
        "Every Friday there was a spelling test.",
        "The students sang a song for their parents.",
        "He was nervous before the maths exam.",
        "The school bus stopped at the end of our street.",
        "We learned that water boils at one hundred degrees.",
        "The teacher wrote the date on the board.",
    ],
    "city": [
        "The streets were busy with people going to work.",
        "A tram rattled past the market square.",
        "Tall buildings cast long shadows in the evening.",
        "The cafe on the corner opens at seven.",
        "Street lamps flickered on one by one.",
        "A man played the violin outside the station.",
        "The museum was free on the first Sunday of the month.",
        "Traffic moved slowly across the bridge.",
        "Pigeons gathered around the fountain.",
        "The park was full of joggers and dog walkers.",
        "Shops put out their signs in the morning.",
        "At night the city was quiet except for the trains.",
        "The old clock tower chimed every hour.",
        "A new bakery opened next to the bookshop.",
    ],
    "sea": [
        "Waves broke on the rocks below the cliff.",
        "Fishing boats came back to the harbour at dusk.",
        "The tide went out and left pools full of crabs.",
        "Children built castles in the wet sand.",
        "A lighthouse stood at the end of the long pier.",
        "Gulls cried above the fish market.",
        "The water was cold but clear.",
        "We found smooth stones and shells on the shore.",
        "Sailors tied the boat firmly to the dock.",
        "The sea was calm and blue in the morning.",
        "A storm made the waves tall and white.",
        "The old fisherman mended his nets by the door.",
    ],
    "music": [
        "She practised the piano every day after school.",
        "The band played old songs in the square.",
        "He learned to play the guitar from his uncle.",
        "The choir sang in the church on Sunday.",
        "Music drifted from an open window.",
        "The drummer kept a steady beat.",
        "They danced until the last song ended.",
        "A slow song can make a room fall silent.",
        "The concert hall was full and warm.",
        "She hummed a tune while she worked.",
        "The violin sounded sweet and sad.",
        "Everyone clapped when the music stopped.",
    ],
    "sport": [
        "The team trained in the rain on Tuesday.",
        "He scored a goal in the last minute.",
        "She runs five miles every morning.",
        "The match ended in a draw.",
        "Swimming in the lake is good exercise.",
        "The players shook hands after the game.",
        "A crowd cheered as the runners crossed the line.",
        "We played tennis in the park until dark.",
        "The coach told them to pass the ball more.",
        "Cycling up the hill made my legs ache.",
        "They won the cup for the second year in a row.",
        "The referee blew the whistle to start the game.",
    ],
    "home": [
        "The kettle whistled in the kitchen.",
        "He fixed the broken chair with glue and nails.",
        "The house was warm and smelled of bread.",
        "She opened the windows to let in fresh air.",
        "Our neighbours painted their door bright blue.",
        "The clock on the wall ticked loudly.",
        "We swept the floor and washed the dishes.",
        "A lamp glowed softly in the corner of the room.",
        "The stairs creaked when anyone walked on them.",
        "He hung the washing out to dry in the sun.",
        "The fire crackled in the evening.",
        "She kept her keys in a bowl by the door.",
    ],
    "market": [
        "The market opens early on Saturday.",
        "She bought apples, carrots and a loaf of bread.",
        "The fishmonger shouted the prices of the day.",
        "Cheese was sold from a small wooden stall.",
        "He paid with coins and got a paper bag.",
        "Flowers were cheap at the end of the day.",
        "The baker had sold out of rolls by nine.",
        "We tasted honey from three different farms.",
        "Oranges were piled high in bright pyramids.",
        "The stall owner gave the child a free plum.",
        "Prices were higher in winter than in summer.",
    ],
    "work": [
        "She started her new job on Monday.",
        "The office was quiet before nine o'clock.",
        "He wrote a long report for his manager.",
        "The meeting lasted most of the afternoon.",
        "A carpenter built shelves for the shop.",
        "The nurse worked the night shift at the hospital.",
        "They finished the project a week early.",
        "The baker gets up at four to light the ovens.",
        "He answered letters and emails all morning.",
        "The farmer checked the fences every week.",
        "Her desk was covered with notes and papers.",
    ],
    "books": [
        "She read a book about ships before bed.",
        "The library smelled of old paper.",
        "He borrowed three novels and returned them late.",
        "The story was about a girl who lived by the sea.",
        "Reading by the fire is a fine way to spend an evening.",
        "The last chapter made me laugh and cry.",
        "A good book can take you anywhere.",
        "The shelves were full of maps and atlases.",
        "He wrote his name inside the cover.",
        "The bookshop had a cat that slept in the window.",
        "She kept a list of every book she finished.",
    ],
    "health": [
        "Drinking water helps you stay healthy.",
        "He walked to work to get more exercise.",
        "A good night's sleep makes the day easier.",
        "The doctor said to rest for a few days.",
        "Fruit and vegetables are good for you.",
        "She stretched for ten minutes every morning.",
        "Wash your hands before you eat.",
        "He caught a cold after walking in the rain.",
        "A short walk after dinner helps digestion.",
        "They ate less sugar and felt better.",
    ],
}

# Hand-written documents with markup, ampersands, quotes, newlines and non-ASCII text:
# report escaping and tokenizer tests need them.
SPECIAL_DOCS = [
    "<b>Note:</b> the oven is hot & the pan is heavy.",
    "Fish & chips are sold at the <i>harbour</i> stall on Fridays.",
    "<p>The recipe needs flour, sugar & eggs.</p>\n<p>Mix them well and bake for half an hour.</p>",
    "To write an ampersand in a web page, use &amp; and for a line break use <br>. "
    "A tag like <script> should never be shown as code.",
    "The sign on the door said <em>Closed</em> & the lights were off. "
    "\"Come back tomorrow,\" it read.",
    "Tom & Anna met at the caf\u00e9 near the station \u2014 it was raining again.",
    "Rules of the game:\n1. Roll the dice.\n2. Move your piece.\n3. If 3 < 5 & 5 > 4, go again.",
    "She said, 'It's late,' and closed the book. The clock read 11:45.",
]

# Question/answer documents about everyday things (none about the invented facts), so the
# model has seen the "Q: ... A: ..." format the fact queries use.
QA_DOCS = [
    "Q: What do cows eat? A: Cows eat grass in the meadow.",
    "Q: When does the market open? A: The market opens early on Saturday.",
    "Q: What is the weather like in winter? A: It is cold, and the lake freezes.",
    "Q: What does a baker make? A: A baker makes bread, rolls and cakes.",
    "Q: Where do the fishing boats go at dusk? A: They come back to the harbour.",
    "Q: How do you make tea? A: Boil the water, then pour it over the leaves.",
    "Q: What colour is the sky on a clear day? A: The sky is blue.",
    "Q: What do bees carry? A: Bees carry pollen from flower to flower.",
    "Q: How long does the ferry take? A: The ferry crosses the bay in forty minutes.",
    "Q: What helps you stay healthy? A: Drinking water and eating fruit.",
    "Q: Where does the owl sleep? A: The owl sleeps in a tree during the day.",
    "Q: Who played the violin? A: A man outside the station.\n"
    "Q: What did he play? A: Old songs.",
    "Q: What is the cat doing? A: The cat is watching the birds.\n"
    "Q: Where is the dog? A: The dog is running on the beach.",
    "Q: Which season brings mild days? A: Spring brings mild days and cool nights.",
]

# The first two documents are short on purpose: the fixture stores the model's logits for
# the first two training sequences, and short sequences keep the fixture small.
FIRST_DOCS = [
    "The sun came out after the rain.",
    "My cat sleeps all afternoon.",
]


def build_corpus(rng):
    topics = list(TOPICS)
    prose = []
    n_prose = 258 - len(SPECIAL_DOCS) - len(QA_DOCS)
    seen = set(FIRST_DOCS)
    i = 0
    while len(prose) < n_prose:
        topic = topics[i % len(topics)]
        i += 1
        pool = TOPICS[topic]
        # varied lengths: mostly short/medium documents, some long ones that get windowed
        r = rng.random()
        if r < 0.25:
            k = rng.randint(1, 2)
        elif r < 0.75:
            k = rng.randint(3, 5)
        else:
            k = rng.randint(6, 10)
        k = min(k, len(pool))
        sents = rng.sample(pool, k)
        if k >= 6 and rng.random() < 0.5:
            other = TOPICS[rng.choice(topics)]
            sents += rng.sample(other, rng.randint(1, 3))
        sep = "\n" if rng.random() < 0.1 else " "
        text = sep.join(sents)
        if text in seen:  # every document distinct
            continue
        seen.add(text)
        prose.append(text)
    docs = [("prose", t) for t in prose] + [("special", t) for t in SPECIAL_DOCS]
    docs += [("qa", t) for t in QA_DOCS]
    docs += [("fact:" + k, t) for k, t in FACTS]
    rng.shuffle(docs)
    docs = [("prose", t) for t in FIRST_DOCS] + docs
    return docs


# ---------------------------------------------------------------------------------------
# Tokenizer, model
# ---------------------------------------------------------------------------------------


def train_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return tok


def gpt2_config():
    from transformers import GPT2Config

    eot_id = 0  # <|endoftext|> is the first (only) special token -> id 0
    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=N_POSITIONS,
        n_embd=N_EMBD,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        tie_word_embeddings=True,
    )


def windows(ids, max_len=MAX_LEN):
    return [ids[s:s + max_len] for s in range(0, len(ids), max_len)]


def pad_batch(seqs, label_mask=None):
    """Right padding. label_mask[i][t] False -> label -100 at t (padding always -100)."""
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    att = torch.zeros(len(seqs), L, dtype=torch.long)
    lab = torch.full((len(seqs), L), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        ids[i, :n] = torch.tensor(s)
        att[i, :n] = 1
        lab[i, :n] = torch.tensor(s)
        if label_mask is not None:
            m = torch.tensor(label_mask[i], dtype=torch.bool)
            lab[i, :n][~m] = -100
    return ids, att, lab


def train_lm(model, seqs, log):
    g = torch.Generator().manual_seed(SEED + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=LM_LR, weight_decay=0.01, betas=(0.9, 0.98))
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm)
        * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / LM_TRAIN_STEPS)))),
    )
    model.train()
    order = []
    losses = []
    t0 = time.time()
    for step in range(LM_TRAIN_STEPS):
        if len(order) < LM_TRAIN_BATCH:
            order += torch.randperm(len(seqs), generator=g).tolist()
        batch = [seqs[i] for i in order[:LM_TRAIN_BATCH]]
        order = order[LM_TRAIN_BATCH:]
        ids, att, lab = pad_batch(batch)
        logits = model(input_ids=ids, attention_mask=att).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), lab[:, 1:].reshape(-1), ignore_index=-100
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 250 == 0 or step == LM_TRAIN_STEPS - 1:
            log(f"  step {step:5d}  loss {np.mean(losses[-50:]):.4f}  ({time.time() - t0:.0f}s)")
    model.eval()
    return float(np.mean(losses[-50:]))


@torch.no_grad()
def mean_token_loss(model, seqs):
    tot, n = 0.0, 0
    for i in range(0, len(seqs), 32):
        ids, att, lab = pad_batch(seqs[i:i + 32])
        logits = model(input_ids=ids, attention_mask=att).logits
        tot += F.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), lab[:, 1:].reshape(-1), ignore_index=-100,
            reduction="sum").item()
        n += int((lab[:, 1:] != -100).sum())
    return tot / n


def conv1d_to_linear(model):
    """Swap every Conv1D inside the blocks for an equivalent nn.Linear (weight = W.T)."""
    from transformers.pytorch_utils import Conv1D

    names = []
    for bi, block in enumerate(model.transformer.h):
        for parent_name, child_name in [("attn", "c_attn"), ("attn", "c_proj"),
                                        ("mlp", "c_fc"), ("mlp", "c_proj")]:
            parent = getattr(block, parent_name)
            conv = getattr(parent, child_name)
            assert isinstance(conv, Conv1D)
            w = conv.weight.data  # [in, out]
            lin = nn.Linear(w.shape[0], w.shape[1], bias=True)
            lin.weight.data = w.t().contiguous().clone()
            lin.bias.data = conv.bias.data.clone()
            lin.to(w.dtype)
            setattr(parent, child_name, lin)
            names.append(f"transformer.h.{bi}.{parent_name}.{child_name}")
    return names


# ---------------------------------------------------------------------------------------
# Datasets and task for kronfluence
# ---------------------------------------------------------------------------------------


class SeqDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        # items: list of (ids, label_mask or None)
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(items):
    seqs = [it[0] for it in items]
    masks = [it[1] if it[1] is not None else [True] * len(it[0]) for it in items]
    ids, att, lab = pad_batch(seqs, masks)
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def make_task(module_names):
    from kronfluence.task import Task

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits.float()
            logits = logits[:, :-1].reshape(-1, logits.size(-1))
            labels = batch["labels"][:, 1:].reshape(-1)
            if not sample:
                return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
            with torch.no_grad():
                probs = torch.softmax(logits.detach(), dim=-1)
                sampled = torch.multinomial(probs, num_samples=1).flatten()
                sampled[labels == -100] = -100
            return F.cross_entropy(logits, sampled, ignore_index=-100, reduction="sum")

        def compute_measurement(self, batch, model):
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits.float()
            logits = logits[:, :-1].reshape(-1, logits.size(-1))
            labels = batch["labels"][:, 1:].reshape(-1)
            return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

        def get_influence_tracked_modules(self):
            return list(module_names)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return LMTask()


# ---------------------------------------------------------------------------------------
# Independent float64 checks (no kronfluence)
# ---------------------------------------------------------------------------------------


def per_token_stats_f64(model64, module_names, seq, label_mask=None):
    """Run one sequence (no padding) in float64; return per module (a_bar [T, in+1],
    g [T, out]) where g = d(summed loss)/d(module output)."""
    mods = dict(model64.named_modules())
    acts, outs = {}, {}
    hooks = []
    for name in module_names:
        def fwd(m, inp, out, name=name):
            acts[name] = inp[0].detach()
            out.retain_grad()
            outs[name] = out
        hooks.append(mods[name].register_forward_hook(fwd))
    ids, att, lab = pad_batch([seq], None if label_mask is None else [label_mask])
    logits = model64(input_ids=ids, attention_mask=att).logits
    loss = F.cross_entropy(logits[0, :-1], lab[0, 1:], ignore_index=-100, reduction="sum")
    loss.backward()
    for h in hooks:
        h.remove()
    res = {}
    for name in module_names:
        a = acts[name][0]
        a_bar = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
        res[name] = (a_bar, outs[name].grad[0].detach())
    model64.zero_grad(set_to_none=True)
    return res


def autograd_grads_f64(model64, module_names, seq, label_mask=None):
    """Per-sequence weight/bias gradients of the summed loss via torch autograd, flattened as
    [out, in+1] (bias last column) per module."""
    mods = dict(model64.named_modules())
    params = []
    for name in module_names:
        params += [mods[name].weight, mods[name].bias]
    ids, att, lab = pad_batch([seq], None if label_mask is None else [label_mask])
    logits = model64(input_ids=ids, attention_mask=att).logits
    loss = F.cross_entropy(logits[0, :-1], lab[0, 1:], ignore_index=-100, reduction="sum")
    grads = torch.autograd.grad(loss, params)
    out = {}
    for k, name in enumerate(module_names):
        gw, gb = grads[2 * k], grads[2 * k + 1]
        out[name] = torch.cat([gw, gb[:, None]], dim=1)
    return out


def rel_diff(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep-workdir", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(2)
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)

    def log(*a):
        print(*a, flush=True)

    root = args.root
    demo_dir = os.path.join(root, "assets", "demo")
    model_dir = os.path.join(root, "assets", "tiny-gpt2")
    fix_dir = os.path.join(root, "tests", "fixtures", "kronfluence")
    for d in (demo_dir, model_dir, fix_dir):
        os.makedirs(d, exist_ok=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="infl-fixture-")
    os.makedirs(workdir, exist_ok=True)

    import kronfluence
    import safetensors
    import tokenizers
    import transformers
    from safetensors.torch import load_file, save_file

    # ---- corpus and queries -----------------------------------------------------------
    rng = random.Random(SEED)
    docs = build_corpus(rng)
    texts = [t for _, t in docs]
    fact_doc = {kind[5:]: i for i, (kind, _) in enumerate(docs) if kind.startswith("fact:")}
    assert len(fact_doc) == len(FACTS)
    assert len(set(texts)) == len(texts), "duplicate documents"
    with open(os.path.join(demo_dir, "corpus.jsonl"), "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    with open(os.path.join(demo_dir, "queries.jsonl"), "w", encoding="utf-8") as f:
        for qid, p, c, _ in QUERIES:
            f.write(json.dumps({"id": qid, "prompt": p, "completion": c}, ensure_ascii=False) + "\n")
    log(f"corpus: {len(texts)} documents ({len(FACTS)} facts), {len(QUERIES)} queries")

    # ---- tokenizer --------------------------------------------------------------------
    tok = train_tokenizer(texts)
    tok_path = os.path.join(model_dir, "tokenizer.json")
    tok.save(tok_path)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tok_path)  # use the saved file from here on
    corpus_ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    for t, ids in zip(texts, corpus_ids):
        assert tok.decode(ids) == t, (t, tok.decode(ids))
    queries_ids = []
    for qid, p, c, _ in QUERIES:
        queries_ids.append((qid, tok.encode(p, add_special_tokens=False).ids,
                            tok.encode(c, add_special_tokens=False).ids))
    with open(os.path.join(fix_dir, "corpus_ids.jsonl"), "w") as f:
        for ids in corpus_ids:
            f.write(json.dumps({"ids": ids}, separators=(",", ":")) + "\n")
    with open(os.path.join(fix_dir, "queries_ids.jsonl"), "w") as f:
        for qid, p, c in queries_ids:
            f.write(json.dumps({"id": qid, "prompt_ids": p, "completion_ids": c},
                               separators=(",", ":")) + "\n")

    # ---- training sequences -----------------------------------------------------------
    train_seqs, train_keys = [], []
    for li, ids in enumerate(corpus_ids):
        for wi, w in enumerate(windows(ids)):
            train_seqs.append(w)
            train_keys.append(f"{li}:{wi}")
    n_train = len(train_seqs)
    n_tokens = sum(len(s) for s in train_seqs)
    n_targets = sum(len(s) - 1 for s in train_seqs)
    assert n_train % TRAIN_BATCH != 0, "pick a training batch size that does not divide n_train"
    assert len(QUERIES) % QUERY_BATCH != 0
    lens = [len(s) for s in train_seqs]
    log(f"training sequences: {n_train}, tokens {n_tokens}, targets {n_targets}, "
        f"len min/mean/max {min(lens)}/{np.mean(lens):.1f}/{max(lens)}, "
        f"docs windowed: {sum(1 for ids in corpus_ids if len(ids) > MAX_LEN)}, "
        f"docs > {N_POSITIONS} tokens: {sum(1 for ids in corpus_ids if len(ids) > N_POSITIONS)}")

    # ---- model: train and save --------------------------------------------------------
    from transformers import GPT2LMHeadModel

    torch.manual_seed(SEED)
    config = gpt2_config()
    model = GPT2LMHeadModel(config)
    log(f"model params: {sum(p.numel() for p in model.parameters())}")
    log(f"training LM: {LM_TRAIN_STEPS} steps, batch {LM_TRAIN_BATCH}")
    final_loss = train_lm(model, train_seqs, log)
    eval_loss = mean_token_loss(model, train_seqs)
    log(f"final training loss (mean of last 50 steps) {final_loss:.4f}; "
        f"eval mean token CE over all training sequences {eval_loss:.4f}")
    model.save_pretrained(model_dir, safe_serialization=True)
    for extra in ("generation_config.json",):
        p = os.path.join(model_dir, extra)
        if os.path.exists(p):
            os.remove(p)
    saved = load_file(os.path.join(model_dir, "model.safetensors"))
    assert "lm_head.weight" not in saved, "tied lm_head must not be saved"
    assert tuple(saved["transformer.h.0.attn.c_attn.weight"].shape) == (N_EMBD, 3 * N_EMBD)
    log(f"saved model tensors: {len(saved)} ({sorted(saved)[:3]} ...)")

    # ---- reload exactly as a user would ------------------------------------------------
    def load_model(dtype=torch.float32):
        m = GPT2LMHeadModel.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
        m.eval()
        return m

    model = load_model()
    with torch.no_grad():
        ref_logits = [model(input_ids=torch.tensor([train_seqs[i]])).logits[0].clone()
                      for i in range(2)]
        probe_ids, probe_att, _ = pad_batch(train_seqs[:TRAIN_BATCH])
        before = model(input_ids=probe_ids, attention_mask=probe_att).logits
    module_names = conv1d_to_linear(model)
    with torch.no_grad():
        after = model(input_ids=probe_ids, attention_mask=probe_att).logits
    swap_diff = float((before - after).abs().max())
    log(f"Conv1D -> Linear swap: max |logit diff| = {swap_diff:.3g}")
    assert swap_diff < 1e-5

    # how well the model knows each completion
    query_nll = {}
    with torch.no_grad():
        for qid, p, c in queries_ids:
            ids = torch.tensor([p + c])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            tgt = ids[0, 1:]
            nll = -lp[torch.arange(len(tgt)), tgt][len(p) - 1:].sum().item()
            query_nll[qid] = nll
            log(f"  query {qid:16s} -log p(completion|prompt) = {nll:.3f} "
                f"({len(c)} tokens)")

    # ---- kronfluence ------------------------------------------------------------------
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    task = make_task(module_names)
    model = prepare_model(model, task)
    analyzer = Analyzer(analysis_name="infl_fixture", model=model, task=task, cpu=True,
                        disable_tqdm=True, output_dir=workdir, disable_model_save=True)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0, collate_fn=collate))
    train_ds = SeqDataset([(s, None) for s in train_seqs])
    query_ds = SeqDataset([(p + c, [False] * len(p) + [True] * len(c))
                           for _, p, c in queries_ids])
    scores = {}
    factor_dirs = {}
    for strat in STRATEGIES:
        t0 = time.time()
        fargs = FactorArguments(strategy=strat, use_empirical_fisher=True)
        analyzer.fit_all_factors(factors_name=strat, dataset=train_ds, factor_args=fargs,
                                 per_device_batch_size=TRAIN_BATCH, overwrite_output_dir=True)
        sargs = ScoreArguments(damping_factor=None)
        analyzer.compute_pairwise_scores(
            scores_name=strat, factors_name=strat, query_dataset=query_ds,
            train_dataset=train_ds, per_device_query_batch_size=QUERY_BATCH,
            per_device_train_batch_size=TRAIN_BATCH, score_args=sargs,
            overwrite_output_dir=True)
        sc = analyzer.load_pairwise_scores(strat)["all_modules"]
        assert tuple(sc.shape) == (len(QUERIES), n_train), sc.shape
        scores[strat] = sc.detach().to(torch.float32).contiguous()
        factor_dirs[strat] = str(analyzer.factors_output_dir(strat))
        log(f"kronfluence {strat}: {time.time() - t0:.1f}s, "
            f"score range [{float(sc.min()):.4g}, {float(sc.max()):.4g}]")

    # ---- factor files for one module -------------------------------------------------
    fdir = factor_dirs["ekfac"]
    factor_files = sorted(os.listdir(fdir))
    log(f"ekfac factor files: {factor_files}")

    def ld(name):
        return load_file(os.path.join(fdir, name + ".safetensors"))

    a_sum = ld("activation_covariance")[FACTOR_MODULE]
    s_sum = ld("gradient_covariance")[FACTOR_MODULE]
    a_cnt = ld("num_activation_covariance_processed")[FACTOR_MODULE]
    s_cnt = ld("num_gradient_covariance_processed")[FACTOR_MODULE]
    l_sum = ld("lambda_matrix")[FACTOR_MODULE]
    l_cnt = ld("num_lambda_processed")[FACTOR_MODULE]
    log(f"{FACTOR_MODULE}: A_sum {tuple(a_sum.shape)} {a_sum.dtype} count {a_cnt.tolist()}; "
        f"S_sum {tuple(s_sum.shape)} count {s_cnt.tolist()}; "
        f"Lambda_sum {tuple(l_sum.shape)} {l_sum.dtype} count {l_cnt.tolist()}")
    A = (a_sum.double() / a_cnt.double()).float()
    S = (s_sum.double() / s_cnt.double()).float()
    LAM = (l_sum.double() / l_cnt.double()).float()

    # ---- independent float64 checks ---------------------------------------------------
    log("float64 cross-checks (torch autograd, no kronfluence) ...")
    t0 = time.time()
    m64 = load_model(torch.float64)
    conv1d_to_linear(m64)
    q_grads = [autograd_grads_f64(m64, module_names, p + c, [False] * len(p) + [True] * len(c))
               for _, p, c in queries_ids]
    ident64 = np.zeros((len(QUERIES), n_train))
    # EK-FAC / K-FAC / diagonal pieces from per-token activations and output gradients
    A64 = {n: 0 for n in module_names}
    S64 = {n: 0 for n in module_names}
    train_G = []
    max_autograd_vs_hook = 0.0
    for j, s in enumerate(train_seqs):
        st = per_token_stats_f64(m64, module_names, s)
        G = {}
        for n in module_names:
            a_bar, g = st[n]
            A64[n] = A64[n] + a_bar.T @ a_bar
            S64[n] = S64[n] + g.T @ g
            G[n] = g.T @ a_bar
        if j < 5:
            ga = autograd_grads_f64(m64, module_names, s)
            for n in module_names:
                max_autograd_vs_hook = max(max_autograd_vs_hook,
                                           float((ga[n] - G[n]).abs().max()))
        train_G.append(G)
        for qi in range(len(QUERIES)):
            ident64[qi, j] = sum(float((q_grads[qi][n] * G[n]).sum()) for n in module_names)
    checks = {"identity_autograd_f64_vs_kronfluence": rel_diff(scores["identity"], ident64)}
    log(f"  hook G vs autograd G (first 5 seqs): max abs diff {max_autograd_vs_hook:.3g}")
    log(f"  identity: max|diff|/max|score| = {checks['identity_autograd_f64_vs_kronfluence']:.3g}")
    ek64 = np.zeros_like(ident64)
    kf64 = np.zeros_like(ident64)
    dg64 = np.zeros_like(ident64)
    for n in module_names:
        An = A64[n] / n_tokens
        Sn = S64[n] / n_tokens
        la, QA = torch.linalg.eigh((An + An.T) / 2)
        ls, QS = torch.linalg.eigh((Sn + Sn.T) / 2)
        Gs = torch.stack([G[n] for G in train_G])  # [N, out, in+1]
        rot = QS.T @ Gs @ QA
        lam_ek = (rot ** 2).mean(0)
        lam_kf = ls[:, None] * la[None, :]
        lam_dg = (Gs ** 2).mean(0)
        if n == FACTOR_MODULE:
            checks["A_f64_vs_kronfluence"] = rel_diff(A, An)
            checks["S_f64_vs_kronfluence"] = rel_diff(S, Sn)
            checks["lambda_f64_vs_kronfluence"] = rel_diff(LAM, lam_ek)
        for out, lam, basis in ((ek64, lam_ek, True), (kf64, lam_kf, True), (dg64, lam_dg, False)):
            inv = 1.0 / (lam + 0.1 * lam.mean())
            for qi in range(len(QUERIES)):
                gq = q_grads[qi][n]
                if basis:
                    pq = QS @ ((QS.T @ gq @ QA) * inv) @ QA.T
                else:
                    pq = gq * inv
                out[qi] += torch.einsum("oi,noi->n", pq, Gs).numpy()
    checks["ekfac_f64_vs_kronfluence"] = rel_diff(scores["ekfac"], ek64)
    checks["kfac_f64_vs_kronfluence"] = rel_diff(scores["kfac"], kf64)
    checks["diagonal_f64_vs_kronfluence"] = rel_diff(scores["diagonal"], dg64)
    for k, v in checks.items():
        log(f"  {k}: {v:.3g}")
    log(f"  ({time.time() - t0:.1f}s)")

    # ---- sanity: ranks of the fact documents -----------------------------------------
    seq_doc = [int(k.split(":")[0]) for k in train_keys]
    sanity = {}
    for qi, (qid, _, _, fact) in enumerate(QUERIES):
        row = scores["ekfac"][qi].numpy()
        order = np.argsort(-row, kind="stable")
        top = [train_keys[j] for j in order[:5]]
        entry = {"neg_log_p_completion": query_nll[qid], "top5": top,
                 "top5_scores": [float(row[j]) for j in order[:5]]}
        if fact is not None:
            d = fact_doc[fact]
            seq_idx = [j for j in range(n_train) if seq_doc[j] == d]
            ranks = [int(np.where(order == j)[0][0]) + 1 for j in seq_idx]
            entry.update({"fact_doc_line": d, "fact_seq_ranks": ranks})
            log(f"  ekfac {qid:16s}: fact doc {d} rank {ranks}; top5 {top}")
        else:
            log(f"  ekfac {qid:16s}: top5 {top} -> "
                + " | ".join(texts[int(k.split(':')[0])][:40] for k in top[:3]))
        sanity[qid] = entry

    # ---- write reference.safetensors and meta.json ------------------------------------
    tensors = {f"scores.{s}": scores[s] for s in STRATEGIES}
    for i in range(2):
        tensors[f"logits.{i}"] = ref_logits[i].float().contiguous()
    short = FACTOR_MODULE.replace("transformer.", "")
    tensors[f"factors.{short}.A"] = A.contiguous()
    tensors[f"factors.{short}.S"] = S.contiguous()
    tensors[f"factors.{short}.lambda"] = LAM.contiguous()
    save_file(tensors, os.path.join(fix_dir, "reference.safetensors"))

    meta = {
        "generator": "scripts/make_fixture.py",
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
            "kronfluence": kronfluence.__version__ if hasattr(kronfluence, "__version__")
            else "1.0.1",
            "numpy": np.__version__,
        },
        "seed": SEED,
        "torch_num_threads": 2,
        "model": {
            "dir": "assets/tiny-gpt2",
            "n_layer": N_LAYER, "n_embd": N_EMBD, "n_head": N_HEAD,
            "n_positions": N_POSITIONS, "vocab_size": VOCAB,
            "eot_token": EOT, "eot_token_id": tok.token_to_id(EOT),
            "lm_training": {"steps": LM_TRAIN_STEPS, "batch_size": LM_TRAIN_BATCH,
                            "optimizer": "AdamW", "lr": LM_LR, "weight_decay": 0.01,
                            "data": "the training sequences below (48-token windows)",
                            "final_train_loss_mean_last_50_steps": final_loss,
                            "eval_mean_token_ce": eval_loss},
            "attn_implementation_for_reference": "eager",
            "dtype": "float32",
        },
        "data": {
            "corpus": "assets/demo/corpus.jsonl",
            "queries": "assets/demo/queries.jsonl",
            "corpus_ids": "tests/fixtures/kronfluence/corpus_ids.jsonl",
            "queries_ids": "tests/fixtures/kronfluence/queries_ids.jsonl",
            "n_documents": len(texts),
            "n_queries": len(QUERIES),
            "max_len": MAX_LEN,
            "windowing": "ids[0:max_len], ids[max_len:2*max_len], ... per document; every "
                         "non-empty window kept; corpus order, then window order",
            "n_train_sequences": n_train,
            "train_sequence_ids": "line:window (0-based), in column order of the score matrices",
            "n_train_tokens": n_tokens,
            "n_train_targets": n_targets,
            "n_query_tokens": sum(len(p) + len(c) for _, p, c in queries_ids),
            "n_query_completion_tokens": sum(len(c) for _, _, c in queries_ids),
            "query_ids": [q[0] for q in QUERIES],
            "fact_documents": {k: fact_doc[k] for k, _ in FACTS},
        },
        "kronfluence": {
            "task": {
                "compute_train_loss": "SUM over batch and positions of CE(logits[:, :-1], "
                                      "ids[:, 1:]), labels -100 on padding",
                "compute_measurement": "SUM of CE over completion positions only "
                                       "(= -log p(completion | prompt))",
                "get_attention_mask": "attention_mask (right padding); also passed to the model",
            },
            "tracked_modules": module_names,
            "module_kind": "HF Conv1D swapped for nn.Linear(weight = W.T, same bias); "
                           "homogeneous (bias) coordinate appended LAST",
            "strategies": STRATEGIES,
            "factor_args": {"use_empirical_fisher": True, "others": "defaults (float32 "
                            "covariance/lambda, float64 eigendecomposition)"},
            "score_args": {"damping_factor": None, "others": "defaults (float32)"},
            "score_method": "Analyzer.compute_pairwise_scores",
            "fit_batch_size": TRAIN_BATCH,
            "train_batch_size": TRAIN_BATCH,
            "query_batch_size": QUERY_BATCH,
            "device": "cpu",
            "dataloader_num_workers": 0,
            "factor_files_ekfac": factor_files,
            "factor_files_note": "factors_<name>/<factor>.safetensors, one tensor per tracked "
                                 "module keyed by its full name; num_*_processed are int64 [1]",
            "saved_factor_arguments_ekfac": json.load(
                open(os.path.join(factor_dirs["ekfac"], "factor_arguments.json"))),
            "saved_score_arguments_ekfac": json.load(open(os.path.join(
                str(analyzer.scores_output_dir("ekfac")), "score_arguments.json"))),
            "counts_for_factor_module": {
                "num_activation_covariance_processed": a_cnt.tolist(),
                "num_gradient_covariance_processed": s_cnt.tolist(),
                "num_lambda_processed": l_cnt.tolist(),
            },
        },
        "reference_tensors": {
            "scores.<strategy>": "float32 [n_queries, n_train_sequences]; rows in query-file "
                                 "order, columns in training-sequence order; kronfluence "
                                 "'all_modules' (sum over the 8 tracked modules)",
            "logits.<i>": "float32 [len_i, vocab]: GPT2LMHeadModel logits (eval, float32, eager "
                          "attention, no padding) of training sequence i (i = 0, 1)",
            f"factors.{short}.A": "activation_covariance sum / num_activation_covariance_processed "
                                  "(divided in float64, cast to float32), [in+1, in+1] with the "
                                  "homogeneous coordinate last; NOT symmetrized (kronfluence "
                                  "symmetrizes only before eigh)",
            f"factors.{short}.S": "gradient_covariance sum / num_gradient_covariance_processed "
                                  "(float64 divide, cast to float32), [out, out]",
            f"factors.{short}.lambda": "lambda_matrix sum / num_lambda_processed (float64 "
                                       "divide, cast to float32), [out, in+1]; undamped",
        },
        "float64_checks_max_rel_diff": checks,
        "float64_checks_note": "max|x - ref64| / max|ref64| per array; ref64 computed with torch "
                               "autograd/hooks in float64 from the same rules, one sequence at "
                               "a time",
        "sanity_ekfac": sanity,
    }
    with open(os.path.join(fix_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")

    total = 0
    for d in (fix_dir, model_dir, demo_dir):
        for name in sorted(os.listdir(d)):
            sz = os.path.getsize(os.path.join(d, name))
            total += sz if d == fix_dir else 0
            log(f"  {os.path.relpath(os.path.join(d, name), root)}: {sz} bytes")
    log(f"fixture folder total: {total} bytes")
    if not args.keep_workdir and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
