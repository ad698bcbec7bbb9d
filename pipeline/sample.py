"""`curate sample OUT`: the embedded synthetic SlimPajama sample.

Writes, deterministically for `--seed`:

    OUT/train/chunk1/example_train_<k>.jsonl.zst   SlimPajama-format shards mixing all seven domains
    OUT/labels/ads.jsonl, ads.valid.jsonl          {"text", "label": "ad" | "clean"}
    OUT/labels/fluency.jsonl, fluency.valid.jsonl  {"text", "label": "fluent" | "disfluent"}
    OUT/lm.txt                                     clean text, one paragraph per line, for KenLM
    OUT/sample.json                                counts and planted shares

Text is built from per-domain templates over topical vocabularies, so it has structure a
classifier, a 5-gram model and a tiny LLaMA can learn. A known share of documents is planted:
advertisements (`meta.planted == "ad"`) and disfluent text (`meta.planted == "disfluent"`:
word salad, shuffled words, repeated fragments, keyword stuffing). Label and LM documents come
from separate random streams and are checked to share no text with the shards, so held-out
evaluation on the shards is honest.
"""
from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import zstandard

from common.errors import CurateError
from pipeline.domains import load_dataset_manifest
from common.files import write_atomic

# Share of each domain's documents planted as advertisements / disfluent text. Web text carries
# most ads in the real corpus, so CommonCrawl and C4 get far more than curated sources.
AD_SHARE = {"CommonCrawl": 0.20, "C4": 0.20, "GitHub": 0.02, "Wikipedia": 0.03,
            "Books": 0.03, "ArXiv": 0.02, "StackExchange": 0.05}
DISFLUENT_SHARE = {"CommonCrawl": 0.12, "C4": 0.12, "GitHub": 0.10, "Wikipedia": 0.12,
                   "Books": 0.12, "ArXiv": 0.10, "StackExchange": 0.12}

# ----------------------------------------------------------------------------- vocabulary
# Each topic has its own nouns, adjectives and regular verbs (base form; past = base + "ed"
# rules below), so documents stay on one subject and n-grams recur the way they do in real text.
TOPICS: dict[str, dict[str, list[str]]] = {
    "cooking": {
        "nouns": ["recipe", "oven", "sauce", "kitchen", "flavor", "ingredient", "dish", "spice", "dough",
                  "skillet", "vegetable", "dinner", "bread", "soup", "garlic", "onion", "butter", "salad"],
        "adjs": ["fresh", "crispy", "savory", "simple", "homemade", "rich", "spicy", "tender", "golden", "warm"],
        "verbs": ["bake", "stir", "roast", "season", "prepare", "cook", "taste", "combine", "serve", "slice"],
    },
    "travel": {
        "nouns": ["journey", "hotel", "beach", "museum", "village", "trail", "island", "guide", "station",
                  "harbor", "valley", "market", "castle", "ferry", "passport", "itinerary", "coast", "bridge"],
        "adjs": ["quiet", "scenic", "crowded", "historic", "remote", "charming", "sunny", "ancient", "busy", "coastal"],
        "verbs": ["visit", "explore", "discover", "book", "cross", "reach", "wander", "follow", "plan", "enjoy"],
    },
    "gardening": {
        "nouns": ["garden", "seed", "soil", "flower", "tomato", "root", "leaf", "shrub", "compost", "bed",
                  "greenhouse", "hedge", "orchard", "seedling", "rose", "herb", "lawn", "pot"],
        "adjs": ["healthy", "shady", "moist", "green", "hardy", "young", "fragrant", "sandy", "lush", "native"],
        "verbs": ["plant", "water", "prune", "harvest", "grow", "mulch", "transplant", "protect", "feed", "weed"],
    },
    "technology": {
        "nouns": ["computer", "network", "server", "device", "battery", "screen", "update", "laptop", "system",
                  "software", "processor", "camera", "cable", "router", "account", "database", "sensor", "chip"],
        "adjs": ["fast", "reliable", "secure", "modern", "wireless", "portable", "powerful", "digital", "new", "smart"],
        "verbs": ["install", "connect", "upgrade", "restart", "configure", "test", "replace", "monitor", "charge", "launch"],
    },
    "health": {
        "nouns": ["patient", "doctor", "clinic", "exercise", "diet", "symptom", "treatment", "sleep", "muscle",
                  "vitamin", "nurse", "therapy", "heart", "habit", "hospital", "injury", "routine", "appointment"],
        "adjs": ["regular", "balanced", "chronic", "mild", "daily", "gentle", "healthy", "careful", "common", "serious"],
        "verbs": ["treat", "prevent", "reduce", "improve", "support", "recover", "monitor", "consult", "walk", "rest"],
    },
    "sports": {
        "nouns": ["team", "season", "coach", "match", "player", "goal", "league", "stadium", "race", "trophy",
                  "training", "victory", "score", "tournament", "fan", "referee", "field", "record"],
        "adjs": ["strong", "young", "final", "early", "late", "home", "national", "local", "tough", "impressive"],
        "verbs": ["win", "defend", "attack", "score", "train", "lead", "play", "finish", "compete", "celebrate"],
    },
    "music": {
        "nouns": ["band", "album", "song", "concert", "guitar", "piano", "singer", "melody", "festival", "studio",
                  "orchestra", "drummer", "record", "lyric", "stage", "audience", "chorus", "tour"],
        "adjs": ["acoustic", "live", "classic", "soft", "loud", "original", "debut", "popular", "haunting", "bright"],
        "verbs": ["perform", "record", "release", "play", "compose", "rehearse", "sing", "listen", "tour", "arrange"],
    },
    "history": {
        "nouns": ["kingdom", "war", "treaty", "empire", "city", "church", "army", "century", "ruler", "colony",
                  "revolution", "parliament", "trade", "manuscript", "dynasty", "settlement", "fortress", "council"],
        "adjs": ["medieval", "ancient", "royal", "northern", "southern", "early", "powerful", "former", "colonial", "rural"],
        "verbs": ["conquer", "establish", "rule", "sign", "defend", "abandon", "restore", "expand", "govern", "destroy"],
    },
    "finance": {
        "nouns": ["market", "bank", "loan", "budget", "investor", "price", "tax", "salary", "stock", "fund",
                  "mortgage", "economy", "savings", "interest", "company", "share", "income", "pension"],
        "adjs": ["annual", "higher", "lower", "stable", "public", "private", "average", "global", "monthly", "total"],
        "verbs": ["invest", "borrow", "save", "report", "increase", "decline", "estimate", "pay", "earn", "spend"],
    },
    "education": {
        "nouns": ["student", "teacher", "school", "lesson", "classroom", "exam", "university", "course", "library",
                  "degree", "homework", "lecture", "semester", "campus", "subject", "curriculum", "essay", "grade"],
        "adjs": ["primary", "secondary", "difficult", "online", "practical", "weekly", "academic", "public", "small", "clear"],
        "verbs": ["learn", "teach", "study", "pass", "attend", "explain", "review", "graduate", "practice", "discuss"],
    },
}
IRREGULAR_PAST = {"win": "won", "lead": "led", "sing": "sang", "grow": "grown", "feed": "fed", "pay": "paid",
                  "earn": "earned", "teach": "taught", "spend": "spent", "rule": "ruled", "book": "booked",
                  "stir": "stirred", "plan": "planned", "slice": "sliced", "water": "watered"}
FIRST = ["Anna", "James", "Maria", "David", "Sofia", "Thomas", "Elena", "Robert", "Laura", "Michael", "Clara",
         "Daniel", "Helen", "Peter", "Grace", "Samuel", "Irene", "Victor", "Julia", "Henry", "Nora", "Oscar"]
LAST = ["Miller", "Novak", "Garcia", "Brennan", "Lindqvist", "Okafor", "Tanaka", "Rossi", "Weber", "Hughes",
        "Costa", "Fischer", "Patel", "Moreau", "Kowalski", "Andersen", "Silva", "Young", "Duncan", "Reyes"]
PLACES = ["Portland", "Leeds", "Lyon", "Bergen", "Porto", "Austin", "Kraków", "Dublin", "Toulouse", "Turin",
          "Halifax", "Adelaide", "Tampere", "Ghent", "Boulder", "Kyoto", "Valencia", "Aarhus", "Graz", "Galway"]
SYLLABLES = ["var", "nol", "ket", "ri", "ma", "sten", "bor", "lin", "da", "gar", "hol", "mer", "ta", "vik",
             "ron", "el", "sa", "dor", "fen", "ula", "brin", "cas", "tor", "wen"]
TIMES = ["week", "month", "year", "season", "summer", "winter", "spring", "weekend", "morning", "evening"]
CONNECT = ["However,", "In addition,", "As a result,", "For example,", "Meanwhile,", "Later,", "In practice,",
           "At the same time,", "Still,", "Because of this,"]

PROSE_TEMPLATES = [
    "The {a} {n} {v3} the {n2} in {place}.",
    "{person} said that the {n} {vp} the {a} {n2} last {time}.",
    "If you want to {v} your {n}, start with a {a} {n2}.",
    "Many people {v} their {n} every {time}, and it {v3} the {n2}.",
    "In {year}, the {n} in {place} was {vp} by {person}.",
    "A {a} {n} can {v} a {n2} better than a {a2} one.",
    "We {vp} the {n} and the {n2} before the {time} ended.",
    "The best way to {v} a {n} is to {v2} the {n2} first.",
    "Most {ns} {v} the {a} {n2} when the {time} starts.",
    "{connect} the {n} {v3} a {a} {n2} for the {ns2}.",
    "There are {num} {a} {ns} near the {n2} in {place}.",
    "Our {n} is {a}, but the {n2} is even more {a2}.",
    "{person} {vp} a {a} {n} and {vp2} the {n2}.",
    "It is important to {v} the {n} before you {v2} the {n2}.",
    "The {n2} of the {n} {vp} after {num} {time}s.",
    "Every {n} needs a {a} {n2} and a {a2} {n3}.",
    "{connect} {person} {vp} the {ns} in {place} in {year}.",
    "You should never {v} a {n} without a {a} {n2}.",
    "The {ns} {vp} the {a} {n2} and the {n3}.",
    "Experts in {place} {v} the {n} to {v2} the {n2}.",
]


IRREGULAR_PLURAL = {"leaf": "leaves", "savings": "savings"}


def plural(n: str) -> str:
    if n in IRREGULAR_PLURAL:
        return IRREGULAR_PLURAL[n]
    if n.endswith(("s", "x", "ch", "sh")):
        return n + "es"
    if n.endswith("y") and n[-2] not in "aeiou":
        return n[:-1] + "ies"
    return n + "s"


def past(v: str) -> str:
    if v in IRREGULAR_PAST:
        return IRREGULAR_PAST[v]
    return v + "d" if v.endswith("e") else v + "ed"


def third(v: str) -> str:
    if v.endswith(("s", "x", "ch", "sh")):
        return v + "es"
    return v + "s"


class Writer:
    """Domain-flavoured text from one random stream."""

    def __init__(self, rng: random.Random) -> None:
        self.r = rng

    # -- small pieces
    def person(self) -> str:
        return f"{self.r.choice(FIRST)} {self.r.choice(LAST)}"

    def proper(self, syllables: int = 2) -> str:
        return "".join(self.r.choice(SYLLABLES) for _ in range(syllables)).capitalize()

    def topic(self) -> tuple[str, dict[str, list[str]]]:
        name = self.r.choice(sorted(TOPICS))
        return name, TOPICS[name]

    def sentence(self, t: dict[str, list[str]]) -> str:
        r = self.r
        n, n2, n3 = r.sample(t["nouns"], 3)
        a, a2 = r.sample(t["adjs"], 2)
        v, v2 = r.sample(t["verbs"], 2)
        s = r.choice(PROSE_TEMPLATES).format(
            n=n, n2=n2, n3=n3, ns=plural(n), ns2=plural(n2), a=a, a2=a2, v=v, v2=v2, v3=third(v),
            vp=past(v), vp2=past(v2), person=self.person(), place=r.choice(PLACES), time=r.choice(TIMES),
            year=r.randint(1850, 2023), num=r.randint(2, 40), connect=r.choice(CONNECT))
        return s[0].upper() + s[1:]

    def paragraph(self, t: dict[str, list[str]], lo: int = 3, hi: int = 7) -> str:
        return " ".join(self.sentence(t) for _ in range(self.r.randint(lo, hi)))

    # -- domains
    def plain_fact(self) -> str:
        """Prices, phone numbers and shops in neutral prose: what a good ad classifier must not flag."""
        r = self.r
        return r.choice(PLAIN_FACTS).format(
            price=r.randint(3, 900), pct=r.randint(2, 40), year=r.randint(1990, 2023), place=r.choice(PLACES),
            phone=f"555-{r.randint(1000, 9999)}", product=r.choice(PRODUCTS), person=self.person(),
            day=r.choice(["Monday", "Tuesday", "Saturday", "Sunday"]))

    def _with_facts(self, paragraphs: list[str]) -> list[str]:
        if self.r.random() < 0.25:
            i = self.r.randrange(len(paragraphs))
            paragraphs[i] = f"{paragraphs[i]} {self.plain_fact()}"
        return paragraphs

    def c4(self) -> str:
        _, t = self.topic()
        return "\n".join(self._with_facts([self.paragraph(t) for _ in range(self.r.randint(2, 5))]))

    def commoncrawl(self) -> str:
        r = self.r
        name, t = self.topic()
        title = f"{r.choice(t['adjs']).capitalize()} {plural(r.choice(t['nouns']))} in {r.choice(PLACES)}"
        lines = [title, "Home | About | Blog | Contact",
                 f"Posted on {r.randint(1, 28)} {r.choice(MONTHS)} {r.randint(2009, 2023)} by {self.person()}"]
        lines += self._with_facts([self.paragraph(t) for _ in range(r.randint(2, 4))])
        lines.append(f"Tags: {name}, {r.choice(t['nouns'])}, {r.choice(t['nouns'])}")
        lines.append(r.choice(["Share this: Facebook Twitter Email", "Leave a comment",
                               f"{r.randint(0, 40)} comments", "Related posts"]))
        return "\n".join(lines)

    def wikipedia(self) -> str:
        r = self.r
        name, t = self.topic()
        title = self.proper(r.randint(2, 3))
        kind = r.choice(t["nouns"])
        out = [title, f"{title} is a {r.choice(t['adjs'])} {kind} in {r.choice(PLACES)}. "
                      f"It was established in {r.randint(1200, 1990)} by {self.person()}. " + self.paragraph(t, 2, 4)]
        for sec in r.sample(["History", "Geography", "Description", "Legacy", "Economy", "Culture", "Notes"], r.randint(2, 3)):
            out.append(f"== {sec} ==")
            out.append(self.paragraph(t, 3, 6))
        out.append(f"== See also ==\nList of {plural(kind)} in {r.choice(PLACES)}")
        return "\n".join(out)

    def books(self) -> str:
        r = self.r
        _, t = self.topic()
        hero, friend = r.sample(FIRST, 2)
        out = [f"CHAPTER {r.choice(ROMAN)}"]
        for _ in range(r.randint(4, 8)):
            if r.random() < 0.4:
                n = r.choice(t["nouns"])
                out.append(f"\"{r.choice(DIALOGUE).format(n=n, a=r.choice(t['adjs']), name=friend)}\" "
                           f"{r.choice(['said', 'asked', 'whispered', 'replied'])} {hero}.")
            else:
                out.append(f"{hero} {r.choice(BOOK_VERBS)} the {r.choice(t['nouns'])} and {r.choice(BOOK_VERBS)} "
                           f"the {r.choice(t['adjs'])} {r.choice(t['nouns'])}. " + self.paragraph(t, 2, 4))
        return "\n\n".join(out)

    def arxiv(self) -> str:
        r = self.r
        _, t = self.topic()
        n1, n2 = r.sample(t["nouns"], 2)
        method = f"{r.choice(MATH_ADJ)} {r.choice(MATH_NOUN)}"
        var = r.choice("xyzuvw")
        sym = r.choice(["\\alpha", "\\beta", "\\lambda", "\\theta", "\\sigma"])
        k = r.choice("nmkd")
        out = ["\\section{Introduction}",
               f"We study the {method} of {plural(n1)} and {plural(n2)}. "
               f"Let ${var} \\in \\mathbb{{R}}^{k}$ and let ${sym} > 0$ be a {r.choice(MATH_ADJ)} parameter. "
               f"Previous work \\cite{{{r.choice(LAST).lower()}{r.randint(1995, 2023)}}} considered the case ${sym} = {r.randint(1, 9)}$.",
               "\\begin{equation}",
               f"  f({var}) = \\sum_{{i=1}}^{{{k}}} {sym} {var}_i^{r.randint(2, 4)} + \\frac{{1}}{{{k}}} \\| {var} \\|_{r.randint(1, 2)}",
               "\\end{equation}",
               f"\\begin{{theorem}}\\label{{thm:{r.choice(MATH_NOUN).replace(' ', '-')}}}",
               f"If ${sym} \\le {r.randint(1, 5)}$ then the {method} converges in $O({k}^{r.randint(1, 3)})$ steps.",
               "\\end{theorem}",
               f"\\section{{{r.choice(['Method', 'Analysis', 'Experiments', 'Results'])}}}",
               f"The proof of Theorem~\\ref{{thm:main}} follows from Lemma~{r.randint(1, 9)}. "
               f"We evaluate the {method} on {r.randint(3, 50)} {plural(n1)} and report the error in Table~{r.randint(1, 4)}.",
               f"\\subsection{{{r.choice(MATH_NOUN).capitalize()}}}",
               f"In this section we show that ${var}_{{t+1}} = {var}_t - {sym} \\nabla f({var}_t)$ is {r.choice(MATH_ADJ)}."]
        return "\n".join(out)

    def github(self) -> str:
        r = self.r
        _, t = self.topic()
        n1, n2, n3 = r.sample(t["nouns"], 3)
        lang = r.choice(["py", "js", "c"])
        fn = f"{r.choice(t['verbs'])}_{n1}"
        if lang == "py":
            return "\n".join([
                f"# Copyright {r.randint(2012, 2023)} {self.person()}",
                f"\"\"\"Utilities for {plural(n1)} and {plural(n2)}.\"\"\"",
                "import os", f"import {r.choice(['json', 'math', 're', 'sys', 'logging'])}", "", "",
                f"def {fn}({plural(n2)}, limit={r.randint(1, 100)}):",
                f"    \"\"\"Return the {plural(n2)} that {r.choice(t['verbs'])} the {n1}.\"\"\"",
                "    result = []",
                f"    for {n2} in {plural(n2)}:",
                f"        if {n2}.{n3} > limit:",
                f"            result.append({n2})",
                "    return result", "", "",
                f"class {n1.capitalize()}{n3.capitalize()}:",
                f"    def __init__(self, {n3}, size={r.randint(1, 64)}):",
                f"        self.{n3} = {n3}", "        self.size = size", "",
                f"    def {r.choice(t['verbs'])}(self):",
                f"        return {fn}([self.{n3}], self.size)", ""])
        if lang == "js":
            return "\n".join([
                f"// {n1} helpers, {r.choice(['MIT', 'Apache-2.0', 'BSD-3-Clause'])} license",
                f"const {n3} = require('./{n3}');", "",
                f"function {fn.replace('_', '')}({plural(n2)}, options = {{}}) {{",
                f"  const limit = options.limit || {r.randint(1, 100)};",
                f"  return {plural(n2)}.filter(({n2}) => {n2}.{n3} > limit);",
                "}", "",
                f"module.exports = {{ {fn.replace('_', '')} }};", ""])
        return "\n".join([
            f"/* {n1}.c: {r.choice(t['verbs'])} {plural(n2)} */",
            "#include <stdio.h>", "#include <stdlib.h>", "",
            f"int {fn}(const int *{plural(n2)}, size_t count)", "{",
            "    int total = 0;",
            "    for (size_t i = 0; i < count; i++) {",
            f"        if ({plural(n2)}[i] > {r.randint(1, 100)})",
            f"            total += {plural(n2)}[i];", "    }", "    return total;", "}", ""])

    def stackexchange(self) -> str:
        r = self.r
        _, t = self.topic()
        n1, n2 = r.sample(t["nouns"], 2)
        v = r.choice(t["verbs"])
        q = [f"Q: How do I {v} a {r.choice(t['adjs'])} {n1} without a {n2}?",
             f"I am trying to {v} my {n1}, but the {n2} keeps failing. {self.sentence(t)} "
             f"I have already tried to {r.choice(t['verbs'])} the {r.choice(t['nouns'])}. What am I missing?"]
        if r.random() < 0.4:
            q.append(f"    {n1} = {v}({n2}, retries={r.randint(1, 5)})")
        for _ in range(r.randint(1, 2)):
            q.append(f"A: You need to {r.choice(t['verbs'])} the {n2} first. " + self.paragraph(t, 2, 4))
        q.append(f"{r.randint(0, 50)} votes. {r.choice(['Thanks, that worked!', 'This answered my question.', 'Accepted.'])}")
        return "\n\n".join(q)

    # -- planted documents
    def advertisement(self, host: str | None = None) -> str:
        """Mostly ad copy; sometimes a little host text so the classifier cannot key on layout."""
        r = self.r
        product = r.choice(PRODUCTS)
        brand = self.proper(2)
        lines = [r.choice(AD_TEMPLATES).format(
            product=product, products=plural(product), brand=brand, lbrand=brand.lower(), pct=r.choice([10, 15, 20, 25, 30, 40, 50, 70]),
            price=r.randint(5, 499), code=f"{r.choice(CODES)}{r.randint(10, 99)}", n=r.randint(2, 5),
            phone=f"1-800-{r.randint(200, 999)}-{r.randint(1000, 9999)}", day=r.choice(DAYS),
            adj=r.choice(AD_ADJ)) for _ in range(r.randint(4, 9))]
        if host is not None and r.random() < 0.5:
            _, t = self.topic()
            lines.insert(0, " ".join(self.sentence(t) for _ in range(r.randint(1, 2))))
        return "\n".join(lines)

    def disfluent(self, clean: str) -> str:
        r = self.r
        words = clean.split()
        kind = r.choice(["salad", "shuffle", "repeat", "stuffing"])
        if kind == "salad":
            _, t = self.topic()
            pool = t["nouns"] + t["adjs"] + t["verbs"] + ["the", "of", "and", "is", "to", "a"]
            return " ".join(r.choice(pool) for _ in range(max(40, len(words))))
        if kind == "shuffle":
            r.shuffle(words)
            return " ".join(words)
        if kind == "repeat":
            out: list[str] = []
            while len(out) < max(40, len(words) // 2):
                i = r.randrange(max(1, len(words) - 4))
                out += words[i:i + r.randint(2, 4)] * r.randint(2, 4)
            return " ".join(out)
        _, t = self.topic()
        keys = [f"{r.choice(t['adjs'])} {r.choice(t['nouns'])}" for _ in range(3)] + [r.choice(PLACES).lower()]
        return " ".join(r.choice(keys) + r.choice(["", " best", " cheap", " online", " near me", " 2023"])
                        for _ in range(r.randint(25, 60)))


MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS = ["Sunday", "Monday", "Friday", "midnight tonight", "this weekend", "tomorrow"]
ROMAN = ["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII", "XIII", "XIV"]
BOOK_VERBS = ["watched", "remembered", "touched", "noticed", "carried", "opened", "followed", "passed", "studied", "found"]
DIALOGUE = ["Where did you put the {n}, {name}?", "I never wanted the {n} to end like this.",
            "The {n} looks {a} tonight.", "Do you think the {n} will still be there tomorrow?",
            "We should have left the {n} alone.", "You are late again, {name}.", "Tell me about the {a} {n}."]
MATH_ADJ = ["convex", "stochastic", "sparse", "linear", "bounded", "adaptive", "robust", "uniform", "smooth", "optimal"]
MATH_NOUN = ["estimator", "operator", "gradient method", "random walk", "spectral bound", "kernel", "lemma",
             "embedding", "regularizer", "approximation"]
PRODUCTS = ["sneaker", "laptop", "mattress", "watch", "phone case", "coffee maker", "handbag", "vitamin pack",
            "vacuum cleaner", "sofa", "headphone", "jacket", "sunglass", "blender", "perfume", "car insurance plan",
            "hosting plan", "skin cream", "gaming chair", "smart speaker"]
AD_ADJ = ["amazing", "unbeatable", "exclusive", "premium", "best-selling", "limited edition", "brand new", "top rated"]
CODES = ["SAVE", "DEAL", "SALE", "FREESHIP", "BONUS", "VIP", "EXTRA", "WELCOME"]
PLAIN_FACTS = [
    "The entrance fee is ${price} for adults, and children under twelve enter free.",
    "Prices in {place} rose by {pct}% in {year}, according to the city council.",
    "The office can be reached at {phone} on weekdays.",
    "{person} paid ${price} for a used {product} in {year}.",
    "The market in {place} is open every {day} until noon.",
    "A survey found that {pct}% of households in {place} own a {product}.",
    "The museum shop sells postcards and maps, and the cafe closes at five.",
    "Shipping times from {place} grew longer after the storm in {year}.",
]
AD_TEMPLATES = [
    "Buy now and save {pct}% on all {products}!",
    "Use discount code {code} at checkout.",
    "Free shipping on all orders over ${price}.",
    "Call {phone} today for a free quote.",
    "Click here to order your {adj} {product} for only ${price}.99!",
    "Limited time offer: get {n} {products} for the price of one!",
    "Visit www.{lbrand}.com and subscribe for exclusive deals.",
    "Hurry, the sale ends {day}!",
    "Best prices guaranteed at {brand}. Order online or in store.",
    "Sign up now and get ${n}0 off your first order.",
    "{brand} {products}: {adj} quality, {pct}% off this week only.",
    "Don't miss out! Only {n} {products} left in stock.",
    "Shop the {adj} {product} collection now at {brand}.",
    "Order before {day} and receive a free gift with every {product}.",
    "Call now: {phone}. Operators are standing by!",
    "Get your {adj} {product} today. Money-back guarantee, no questions asked.",
    "Save big on {products} with code {code}. Click here!",
    "Lowest price of the year: {product} now only ${price}!",
]

DOMAIN_WRITERS = {"CommonCrawl": Writer.commoncrawl, "C4": Writer.c4, "GitHub": Writer.github,
                  "Wikipedia": Writer.wikipedia, "Books": Writer.books, "ArXiv": Writer.arxiv,
                  "StackExchange": Writer.stackexchange}


# ----------------------------------------------------------------------------- generation
def _documents(rng: random.Random, domain: str, n: int) -> list[tuple[str, str | None]]:
    """`n` documents of one domain as (text, planted) with exact planted counts."""
    w = Writer(rng)
    n_ad = round(n * AD_SHARE[domain])
    n_dis = round(n * DISFLUENT_SHARE[domain])
    kinds: list[str | None] = ["ad"] * n_ad + ["disfluent"] * n_dis + [None] * (n - n_ad - n_dis)
    rng.shuffle(kinds)
    make = DOMAIN_WRITERS[domain]
    docs = []
    for kind in kinds:
        if kind == "ad":
            docs.append((w.advertisement(host=domain), "ad"))
        elif kind == "disfluent":
            docs.append((w.disfluent(make(w)), "disfluent"))
        else:
            docs.append((make(w), None))
    return docs


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _label_rows(rng: random.Random, domains: tuple[str, ...], per_domain: int, seen: set[str],
                task: str) -> list[dict]:
    """Labelled documents for one classifier task, balanced over labels and domains."""
    w = Writer(rng)
    rows = []
    for d in domains:
        make = DOMAIN_WRITERS[d]
        for _ in range(per_domain):
            clean = make(w)
            if task == "ads":
                # disfluent text (keyword stuffing included) is "clean" here: the disfluency filter owns it
                pos, neg = w.advertisement(host=d), (clean if rng.random() > 0.15 else w.disfluent(make(w)))
                labels = ("ad", "clean")
            else:
                # the fluency classifier must not confuse ads with disfluency: ads count as fluent
                pos, neg = w.disfluent(make(w)), (clean if rng.random() > 0.1 else w.advertisement(host=d))
                labels = ("disfluent", "fluent")
            for text, label in ((pos, labels[0]), (neg, labels[1])):
                if text not in seen:       # never reuse a shard document in the labels
                    seen.add(text)
                    rows.append({"text": text, "label": label, "domain": d})
    rng.shuffle(rows)
    return rows


def write_sample(out: Path, seed: int = 0, docs_per_domain: int = 600, shards: int = 4) -> dict:
    manifest = load_dataset_manifest(None)
    set_name = {d: s for s, d in manifest.set_names.items()}
    unknown = [d for d in manifest.domains if d not in DOMAIN_WRITERS]
    if unknown:
        raise CurateError(f"no synthetic text writer for domain(s) {unknown}")
    # independent streams, so changing one part's size never changes the others' text
    streams = {k: random.Random(f"{seed}:{k}") for k in ("shards", "mix", "ads", "fluency", "lm")}

    docs = []
    for d in manifest.domains:
        for text, planted in _documents(streams["shards"], d, docs_per_domain):
            meta = {"redpajama_set_name": set_name[d]}
            if planted:
                meta["planted"] = planted
            docs.append({"text": text, "meta": meta})
    streams["mix"].shuffle(docs)
    chunk = out / "train" / "chunk1"
    chunk.mkdir(parents=True, exist_ok=True)
    cctx = zstandard.ZstdCompressor(level=3)
    for k in range(shards):
        write_atomic(chunk / f"example_train_{k}.jsonl.zst", cctx.compress(_jsonl(docs[k::shards])))

    seen = {doc["text"] for doc in docs}
    labels = out / "labels"
    labels.mkdir(exist_ok=True)
    per_domain = max(20, docs_per_domain // 3)
    label_counts = {}
    for task in ("ads", "fluency"):
        rows = _label_rows(streams[task], manifest.domains, per_domain, seen, task)
        n_valid = len(rows) // 5
        write_atomic(labels / f"{task}.jsonl", _jsonl(rows[n_valid:]))
        write_atomic(labels / f"{task}.valid.jsonl", _jsonl(rows[:n_valid]))
        label_counts[task] = {"train": dict(sorted(Counter(r["label"] for r in rows[n_valid:]).items())),
                              "valid": dict(sorted(Counter(r["label"] for r in rows[:n_valid]).items()))}

    # clean text of every domain, one paragraph per line, so perplexity is comparable across domains
    w = Writer(streams["lm"])
    lines: list[str] = []
    for _ in range(max(10, docs_per_domain // 2)):
        for d in manifest.domains:
            text = DOMAIN_WRITERS[d](w)
            if text not in seen:
                lines += [ln.strip() for ln in text.split("\n") if ln.strip()]
    write_atomic(out / "lm.txt", ("\n".join(lines) + "\n").encode())

    by_domain = {}
    for d in manifest.domains:
        planted = Counter(doc["meta"].get("planted", "clean") for doc in docs
                          if manifest.set_names[doc["meta"]["redpajama_set_name"]] == d)
        by_domain[d] = {"docs": sum(planted.values()), "ad": planted["ad"], "disfluent": planted["disfluent"],
                        "ad_share": AD_SHARE[d], "disfluent_share": DISFLUENT_SHARE[d]}
    summary = {
        "kind": "sample", "seed": seed, "docs_per_domain": docs_per_domain, "shards": shards,
        "docs": len(docs), "by_domain": by_domain,
        "planted": {"ad": sum(v["ad"] for v in by_domain.values()),
                    "disfluent": sum(v["disfluent"] for v in by_domain.values())},
        "labels": label_counts, "lm_lines": len(lines),
        "files": {"shards": "train/chunk1/*.jsonl.zst", "ads": "labels/ads.jsonl", "ads_valid": "labels/ads.valid.jsonl",
                  "fluency": "labels/fluency.jsonl", "fluency_valid": "labels/fluency.valid.jsonl", "lm": "lm.txt"},
    }
    write_atomic(out / "sample.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed (the output is a function of it)")
    p.add_argument("--docs-per-domain", type=int, default=600, help="shard documents per domain (default: 600)")
    p.add_argument("--shards", type=int, default=4, help="number of .jsonl.zst shards (default: 4)")


def run(args: argparse.Namespace) -> int:
    if args.docs_per_domain < 1:
        raise CurateError(f"--docs-per-domain must be at least 1, got {args.docs_per_domain}")
    if args.shards < 1:
        raise CurateError(f"--shards must be at least 1, got {args.shards}")
    out = Path(args.out)
    s = write_sample(out, seed=args.seed, docs_per_domain=args.docs_per_domain, shards=args.shards)
    print(f"wrote {s['docs']} documents in {s['shards']} shards to {out}/train/chunk1 "
          f"({s['planted']['ad']} planted ads, {s['planted']['disfluent']} disfluent), "
          f"labels in {out}/labels, {s['lm_lines']} LM lines in {out}/lm.txt")
    return 0
