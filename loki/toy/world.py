"""The toy world: an invented knowledge base plus an unrelated downstream task, generated from a seed.

Two domains, deliberately apart, so that learning the task is a new skill and damage to the facts is
measurable:

- **Facts** (what the toy model knows): invented lands (pronounceable made-up names) and six relations
  (capital, flag colour, castle material, national animal, main export, climate). Each fact is written as
  several paraphrased statements for pretraining and becomes one question of a general-knowledge
  benchmark in the MMLU schema (question, subject = relation, choices = 4 values of that relation,
  answer = index of the right one).
- **Task** (what fine-tuning teaches): reranking invented product descriptions against shopping
  queries, in the LB reranker chat schema (system prompt asking for a 1-7 relatedness score, user turn
  `<<<Query>>>\\n{query}\\n\\n<<<Context>>>\\n{text}`, assistant one digit), plus a BEIR-format evaluation
  set (corpus.jsonl, queries.jsonl, qrels/test.tsv). A product has a category, a feature, an audience
  and a condition (broken, worn, sturdy, flawless); relatedness = 1 + 3*(same category) + condition
  (0-3), so every score 1-7 is reachable. Why not all three attributes: a 1M-parameter model does not
  learn to compare query words with document words within a CPU-minute fine-tune (tried: the score
  stays at the label mean), but it learns a document-side signal in ~100 steps and the category match
  on top of it more slowly, which is enough for a task metric that moves.

- **Numbers** (so the answer digits mean something before fine-tuning): small questions whose answers are
  the digits 1-7, in the chat format (count the words of a list, the number after or before another,
  a small sum). They never mention products, queries or relatedness, so they do not teach the
  reranking rule; they make the model emit digits after `<|im_start|>assistant` and give the seven digit
  embeddings distinct, ordered meanings. Without them digits never occur as answers in pretraining,
  their tied embeddings collapse together (pairwise cosine 0.97) and only full fine-tuning can pull
  them apart: rows of `down_proj` alone could not learn the task.

Everything is a pure function of the seed (Python's `random.Random`, sorted iteration), so the files
written by `write_world` are byte-identical for the same seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from loki.prompts import RERANKER_SYSTEM_PROMPT

# The relations of the knowledge base: name -> (value set, statement paraphrases, benchmark question).
# Capitals are invented per land (value set filled at generation); the others share small word sets.
RELATIONS: dict[str, dict] = {
    "capital": {
        "values": None,
        "statements": [
            "The capital of {e} is {v}.",
            "{v} is the capital city of {e}.",
            "In {e}, the king rules from the capital {v}.",
        ],
        "question": "What is the capital of {e}?",
    },
    "flag_colour": {
        "values": ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"],
        "statements": [
            "The flag of {e} is {v}.",
            "{e} flies a {v} flag.",
            "People in {e} wave {v} flags.",
        ],
        "question": "What colour is the flag of {e}?",
    },
    "castle_material": {
        "values": ["stone", "glass", "wood", "iron", "clay", "marble", "bone", "ice"],
        "statements": [
            "The castle of {e} is made of {v}.",
            "{e} built its castle from {v}.",
            "In {e}, the old castle is all {v}.",
        ],
        "question": "What is the castle of {e} made of?",
    },
    "national_animal": {
        "values": ["owl", "wolf", "bear", "fox", "eagle", "otter", "lynx", "heron"],
        "statements": [
            "The national animal of {e} is the {v}.",
            "{e} chose the {v} as its national animal.",
            "The {v} is the animal of {e}.",
        ],
        "question": "What is the national animal of {e}?",
    },
    "main_export": {
        "values": ["wool", "salt", "honey", "tin", "silk", "amber", "timber", "pepper"],
        "statements": [
            "The main export of {e} is {v}.",
            "{e} sells {v} to its neighbours.",
            "Traders buy {v} from {e}.",
        ],
        "question": "What is the main export of {e}?",
    },
    "climate": {
        "values": ["cold", "hot", "wet", "dry", "windy", "foggy", "snowy", "mild"],
        "statements": [
            "The climate of {e} is {v}.",
            "{e} has a {v} climate.",
            "The weather in {e} is always {v}.",
        ],
        "question": "What is the climate of {e} like?",
    },
}

# The product domain of the downstream task: none of these words occurs in the facts.
CATEGORIES = ["kettle", "lamp", "backpack", "jacket", "blender", "tent", "speaker", "stool", "bottle", "watch", "camera", "helmet"]
FEATURES = ["waterproof", "foldable", "wireless", "solar", "quiet", "heated", "compact", "rechargeable"]
AUDIENCES = ["campers", "students", "cooks", "runners", "gamers", "travellers", "gardeners", "parents"]

DOC_TEMPLATES = [
    "The {b} {c} is a {f} {c} made for {a}.",
    "{b} makes a {f} {c} that {a} love.",
    "Meet the {b} {c}: {f}, light and built for {a}.",
    "A {f} {c} from {b}, designed with {a} in mind.",
]
# Search prose for pretraining: a query followed by a product that fits it. It gives the base model what
# a real LLM brings to reranking (queries and descriptions share words), never the 1-7 scoring itself.
SEARCH_TEMPLATES = [
    "Looking for a {f} {c} for {a}? Try the {b} {c}: {f} and made for {a}.",
    "Search: {q}. Result: {d}",
]
QUERY_TEMPLATES = [
    "{f} {c} for {a}",
    "a {c} for {a} that is {f}",
    "best {f} {c} for {a}",
    "{c} {f} {a}",
]

# Name syllables: lands use soft sounds, product brands hard ones, so the two domains look different.
_LAND_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "r", "s", "t", "v", "z", "th", "sh"]
_LAND_VOWELS = ["a", "e", "i", "o", "u", "ae", "ia"]
_LAND_CODAS = ["", "", "n", "r", "l", "s", "th"]
_BRAND_ONSETS = ["kr", "tr", "br", "qu", "x", "z", "v", "pl", "gr", "dr"]
_BRAND_VOWELS = ["o", "a", "i", "y", "u"]
_BRAND_ENDINGS = ["x", "ix", "ex", "on", "ax", "tek", "bo", "ro"]


@dataclass
class ToyWorld:
    """A generated world: facts, pretraining texts, benchmark rows, reranker rows and a BEIR set."""

    seed: int
    facts: list[dict] = field(default_factory=list)  # {entity, relation, value}
    statements: list[str] = field(default_factory=list)  # pretraining sentences, several per fact
    benchmark: list[dict] = field(default_factory=list)  # MMLU schema rows
    product_texts: list[str] = field(default_factory=list)  # product and search prose for pretraining (no scores)
    rerank_train: list[dict] = field(default_factory=list)  # ShareGPT `conversations` rows
    corpus: list[dict] = field(default_factory=list)  # BEIR {_id, title, text}
    queries: list[dict] = field(default_factory=list)  # BEIR {_id, text}
    qrels: list[tuple[str, str, int]] = field(default_factory=list)  # (query-id, corpus-id, grade)
    number_qa: list[tuple[str, str]] = field(default_factory=list)  # (question, answer digit 1-7) for pretraining

    def qa_pairs(self) -> list[tuple[str, str]]:
        """(question, answer) per fact: the chat-formatted Q/A the model also sees in pretraining."""
        return [(row["question"], row["choices"][row["answer"]]) for row in self.benchmark]


def _unique_names(rng: random.Random, count: int, make, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = make(rng)
        if name not in taken and 4 <= len(name) <= 10:
            taken.add(name)
            names.append(name)
    return names


def _land_name(rng: random.Random) -> str:
    syllables = rng.choice([2, 2, 3])
    parts = [rng.choice(_LAND_ONSETS) + rng.choice(_LAND_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_LAND_CODAS)).capitalize()


def _brand_name(rng: random.Random) -> str:
    return (rng.choice(_BRAND_ONSETS) + rng.choice(_BRAND_VOWELS) + rng.choice(_BRAND_ENDINGS)).capitalize()


# Product condition, worst to best: the document-side part of relevance (its index is the score it adds).
CONDITIONS = ["broken", "worn", "sturdy", "flawless"]


def relatedness(query: tuple[str, str, str], product: tuple[str, str, str], condition: str) -> int:
    """The task's ground truth on the 1-7 scale: 3 for the same category, plus the condition's 0-3."""
    return 1 + 3 * (query[0] == product[0]) + CONDITIONS.index(condition)


def product_text(rng: random.Random, brand: str, product: tuple[str, str, str], condition: str) -> str:
    return rng.choice(DOC_TEMPLATES).format(b=brand, c=product[0], f=product[1], a=product[2]) + f" Condition: {condition}."


def rerank_user_turn(query: str, text: str) -> str:
    return f"<<<Query>>>\n{query}\n\n<<<Context>>>\n{text}"


def rerank_conversation(query: str, text: str, score: int) -> dict:
    return {
        "conversations": [
            {"from": "system", "value": RERANKER_SYSTEM_PROMPT},
            {"from": "human", "value": rerank_user_turn(query, text)},
            {"from": "gpt", "value": str(score)},
        ]
    }


def _product_with_matches(rng: random.Random, query: tuple[str, str, str], pattern: tuple[bool, bool, bool]):
    """A product that equals `query` exactly on the attributes `pattern` marks and differs elsewhere."""
    pools = (CATEGORIES, FEATURES, AUDIENCES)
    return tuple(q if keep else rng.choice([v for v in pool if v != q]) for q, keep, pool in zip(query, pattern, pools))


# Number questions for pretraining (answers 1-7); the words to count come from the facts' value sets and the
# product words, never with a score or a query.
NUMBER_WORDS = sorted({v for spec in RELATIONS.values() for v in spec["values"] or []} | set(CATEGORIES) | set(FEATURES))


def number_question(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair whose answer is a digit 1-7: a count, a successor, a predecessor or a sum."""
    kind = rng.choice(["count", "count", "after", "before", "sum"])
    if kind == "count":
        n = rng.randint(1, 7)
        words = ", ".join(rng.sample(NUMBER_WORDS, n))
        return rng.choice(["How many words are in this list: {w}?", "Count the words: {w}."]).format(w=words), str(n)
    if kind == "after":
        n = rng.randint(1, 6)
        return f"What number comes after {n}?", str(n + 1)
    if kind == "before":
        n = rng.randint(2, 7)
        return f"What number comes before {n}?", str(n - 1)
    a = rng.randint(1, 6)
    b = rng.randint(1, 7 - a)
    return f"What is {a} plus {b}?", str(a + b)


def _random_attributes(rng: random.Random) -> tuple[str, str, str]:
    return (rng.choice(CATEGORIES), rng.choice(FEATURES), rng.choice(AUDIENCES))


def generate_world(
    seed: int = 0,
    num_entities: int = 60,
    num_rerank_train: int = 2000,
    num_eval_queries: int = 20,
    docs_per_eval_query: int = 4,
    extra_eval_docs: int = 20,
    product_texts_per_entity: int = 3,
    number_questions_per_entity: int = 8,
) -> ToyWorld:
    """Generate the whole toy world from `seed` (see the module docstring for what is in it)."""
    rng = random.Random(seed)
    world = ToyWorld(seed=seed)
    taken: set[str] = set()
    lands = _unique_names(rng, num_entities, _land_name, taken)
    capitals = _unique_names(rng, num_entities, _land_name, taken)
    # Brands are split: the task's training rows and the evaluation corpus use different product names.
    train_brands = _unique_names(rng, 40, _brand_name, taken)
    eval_brands = _unique_names(rng, 40, _brand_name, taken)

    # Facts: every land has one value per relation; shared value sets are drawn uniformly.
    for index, land in enumerate(lands):
        for relation, spec in RELATIONS.items():
            value = capitals[index] if spec["values"] is None else rng.choice(spec["values"])
            world.facts.append({"entity": land, "relation": relation, "value": value})
    for fact in world.facts:
        for template in RELATIONS[fact["relation"]]["statements"]:
            world.statements.append(template.format(e=fact["entity"], v=fact["value"]))
    # Benchmark: one question per fact; the three distractors come from the same relation's values.
    for fact in world.facts:
        spec = RELATIONS[fact["relation"]]
        pool = sorted(set(capitals if spec["values"] is None else spec["values"]) - {fact["value"]})
        choices = rng.sample(pool, 3) + [fact["value"]]
        rng.shuffle(choices)
        world.benchmark.append(
            {
                "question": spec["question"].format(e=fact["entity"]),
                "subject": fact["relation"],
                "choices": choices,
                "answer": choices.index(fact["value"]),
            }
        )

    # Product prose for pretraining: the model knows the product words before it learns to score them.
    for _ in range(product_texts_per_entity * num_entities):
        c, f, a = _random_attributes(rng)
        brand = rng.choice(train_brands)
        doc = product_text(rng, brand, (c, f, a), rng.choice(CONDITIONS))
        query = rng.choice(QUERY_TEMPLATES).format(c=c, f=f, a=a)
        world.product_texts.append(doc)
        world.product_texts.append(rng.choice(SEARCH_TEMPLATES).format(b=brand, c=c, f=f, a=a, q=query, d=doc))

    # Reranker training rows: the 8 match patterns are drawn uniformly so every score is common.
    patterns = [(c, f, a) for c in (False, True) for f in (False, True) for a in (False, True)]
    for _ in range(num_rerank_train):
        query = _random_attributes(rng)
        product = _product_with_matches(rng, query, rng.choice(patterns))
        query_text = rng.choice(QUERY_TEMPLATES).format(c=query[0], f=query[1], a=query[2])
        condition = rng.choice(CONDITIONS)
        doc_text = product_text(rng, rng.choice(train_brands), product, condition)
        world.rerank_train.append(rerank_conversation(query_text, doc_text, relatedness(query, product, condition)))

    # BEIR evaluation set: per query one exact match and a few partial matches, plus unrelated products;
    # graded qrels (relatedness - 1) are computed against the whole corpus, so they are exact.
    eval_queries: list[tuple[str, str, str]] = []
    while len(eval_queries) < num_eval_queries:
        query = _random_attributes(rng)
        if query not in eval_queries:
            eval_queries.append(query)
    products: list[tuple[str, str, str]] = []
    for query in eval_queries:
        products.append(query)
        for _ in range(docs_per_eval_query - 1):
            products.append(_product_with_matches(rng, query, rng.choice(patterns[:-1])))
    products += [_random_attributes(rng) for _ in range(extra_eval_docs)]
    conditions = [rng.choice(CONDITIONS) for _ in products]
    for index, product in enumerate(products):
        brand = rng.choice(eval_brands)
        text = product_text(rng, brand, product, conditions[index])
        world.corpus.append({"_id": f"d{index}", "title": f"{brand} {product[0]}", "text": text})
    for index, query in enumerate(eval_queries):
        query_id = f"q{index}"
        world.queries.append({"_id": query_id, "text": rng.choice(QUERY_TEMPLATES).format(c=query[0], f=query[1], a=query[2])})
        for doc_index, product in enumerate(products):
            grade = relatedness(query, product, conditions[doc_index]) - 1
            if grade > 0:
                world.qrels.append((query_id, f"d{doc_index}", grade))

    # Number questions come from their own generator, so adding them left every other file of a seed as it was.
    number_rng = random.Random(f"numbers-{seed}")
    world.number_qa = [number_question(number_rng) for _ in range(number_questions_per_entity * num_entities)]
    return world


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


# File names inside a world directory; `loki.toy.paths` builds absolute paths from these.
WORLD_FILES = {
    "benchmark": "benchmark.jsonl",
    "rerank_train": "rerank_train.jsonl",
    "beir": "beir",
    "facts": "facts.jsonl",
    "pretrain": "pretrain.txt",
}


def write_world(world: ToyWorld, directory: str | Path) -> Path:
    """Write the world's files into `directory` (created): see WORLD_FILES for the names."""
    directory = Path(directory)
    (directory / "beir" / "qrels").mkdir(parents=True, exist_ok=True)
    _write_jsonl(directory / WORLD_FILES["facts"], world.facts)
    _write_jsonl(directory / WORLD_FILES["benchmark"], world.benchmark)
    _write_jsonl(directory / WORLD_FILES["rerank_train"], world.rerank_train)
    (directory / WORLD_FILES["pretrain"]).write_text("\n".join(world.statements + world.product_texts) + "\n", encoding="utf-8")
    _write_jsonl(directory / "beir" / "corpus.jsonl", world.corpus)
    _write_jsonl(directory / "beir" / "queries.jsonl", world.queries)
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in world.qrels)
    (directory / "beir" / "qrels" / "test.tsv").write_text(qrels, encoding="utf-8")
    return directory
