"""Built-in tasks, generated offline from a seed. Each has ``train``, ``test`` and ``shifted`` splits of plain-text
prompt/response pairs, scored by exact match (whitespace-normalized); accuracy is a fraction in [0, 1].

They ask for what ``builtin:base`` learned in pretraining (see ``leantune.base.corpus``):

- ``builtin:world``: questions about the attributes of the synthetic world's people. ``train`` covers half of the
  people, ``test`` asks about the other half, whose facts the model saw only in pretraining (knowledge
  extraction); ``shifted`` asks about the test half with question templates never used in ``train``.
- ``builtin:arith``: short arithmetic word problems, exact-match number. ``test`` uses number pairs never seen in
  ``train``; ``shifted`` uses other templates and larger numbers (50-99).
- ``builtin:listops``: instructions on lists of digits and strings of letters (reverse, sort, first, last,
  largest, smallest, length). ``test`` has inputs never seen in ``train``; ``shifted`` has longer inputs.

:func:`forgetting` gives the loss on held-out pretraining text; a bench reports it after minus before fine-tuning.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .encode import Example
from .evaluate import generate_accuracy, normalize

TASK_PREFIX = "builtin:"


@dataclass
class Task:
    name: str
    description: str
    splits: dict[str, list[Example]] = field(default_factory=dict)
    max_new_tokens: int = 8  # enough for the longest answer plus EOS
    chance: float = 0.0  # accuracy of guessing uniformly among the possible answers (0 when open-ended)

    def split(self, name: str) -> list[Example]:
        if name not in self.splits:
            raise ValueError(f"task {self.name!r} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def score(self, prediction: str, example: Example) -> bool:
        """Exact match after whitespace normalization."""
        return normalize(prediction) == normalize(example.response)

    def accuracy(self, model, tokenizer, split: str = "test", limit: int | None = None) -> dict:
        """Greedy generation + :meth:`score` on a split (the first ``limit`` examples when given)."""
        examples = self.split(split)[:limit] if limit else self.split(split)
        return generate_accuracy(model, tokenizer, examples, max_new_tokens=self.max_new_tokens, scorer=self.score)


def _qa(question: str, answer) -> Example:
    return Example(f"{question} Answer:", f" {answer}")


# ---------------------------------------------------------------- builtin:world

WORLD_QUESTIONS = {
    "city": ["Where does {n} live?", "Which city is home to {n}?"],
    "job": ["What is the job of {n}?", "What does {n} do for a living?"],
    "pet": ["What pet does {n} own?", "Which animal does {n} keep as a pet?"],
    "hobby": ["What is the hobby of {n}?", "What does {n} enjoy in free time?"],
}
WORLD_QUESTIONS_SHIFTED = {
    "city": ["In which town can {n} be found?", "Name the city where {n} has a house."],
    "job": ["Which profession does {n} practice?", "Name the occupation of {n}."],
    "pet": ["Which creature shares a home with {n}?", "Name the animal that {n} looks after."],
    "hobby": ["Which pastime does {n} love?", "Name the favorite activity of {n}."],
}


def world_split(seed: int = 0):
    """``(train_entities, test_entities)``: the world of ``builtin:base`` cut in two halves by ``seed``."""
    from ..base.corpus import CorpusConfig, make_world

    cfg = CorpusConfig()
    entities = make_world(cfg.world_seed, cfg.n_entities)
    order = list(range(len(entities)))
    random.Random(f"world-task-{seed}").shuffle(order)
    half = len(order) // 2
    return [entities[i] for i in sorted(order[:half])], [entities[i] for i in sorted(order[half:])]


def world(seed: int = 0) -> Task:
    from ..base.corpus import ATTRIBUTES

    rng = random.Random(f"world-questions-{seed}")
    train_people, test_people = world_split(seed)
    train = [Example(f"Question: {q.format(n=e.name)} Answer:", f" {e.facts[a]}")
             for e in train_people for a, qs in WORLD_QUESTIONS.items() for q in qs]
    rng.shuffle(train)
    test = [Example(f"Question: {rng.choice(WORLD_QUESTIONS[a]).format(n=e.name)} Answer:", f" {e.facts[a]}")
            for e in test_people for a in WORLD_QUESTIONS]
    shifted = [Example(f"Question: {rng.choice(WORLD_QUESTIONS_SHIFTED[a]).format(n=e.name)} Answer:",
                       f" {e.facts[a]}") for e in test_people for a in WORLD_QUESTIONS_SHIFTED]
    chance = sum(1 / len(v) for v in ATTRIBUTES.values()) / len(ATTRIBUTES)
    return Task("builtin:world", "questions about people of the base model's synthetic world; test asks about "
                "people never seen in fine-tuning", {"train": train, "test": test, "shifted": shifted},
                max_new_tokens=8, chance=chance)


# ---------------------------------------------------------------- builtin:arith

# (template, operation): "+" adds, "-" subtracts the smaller number from the larger.
ARITH_TEMPLATES = [
    ("What is {a} plus {b}?", "+"), ("Add {a} and {b}.", "+"),
    ("Tom has {a} apples and buys {b} more. How many apples does he have?", "+"),
    ("What is {a} minus {b}?", "-"), ("Subtract {b} from {a}.", "-"),
    ("A jar holds {a} coins and {b} are taken out. How many coins are left?", "-"),
]
ARITH_TEMPLATES_SHIFTED = [
    ("Compute {a} + {b}.", "+"), ("Find the sum of {a} and {b}.", "+"),
    ("A shelf has {a} books and {b} more arrive. How many books are on the shelf?", "+"),
    ("How much is {a} take away {b}?", "-"),
    ("A bus carries {a} people and {b} get off. How many people remain?", "-"),
]


def _arith_example(rng: random.Random, templates, pair) -> Example:
    template, op = rng.choice(templates)
    a, b = max(pair), min(pair)  # differences stay non-negative
    if op == "+" and rng.random() < 0.5:
        a, b = b, a
    return _qa(template.format(a=a, b=b), a + b if op == "+" else a - b)


def arith(seed: int = 0, n_train: int = 2000, n_test: int = 200) -> Task:
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(50) for b in range(a + 1)]  # unordered: a test pair never appears swapped
    rng.shuffle(pairs)
    test_pairs, train_pairs = pairs[:n_test], pairs[n_test:]
    train = [_arith_example(rng, ARITH_TEMPLATES, train_pairs[i % len(train_pairs)]) for i in range(n_train)]
    test = [_arith_example(rng, ARITH_TEMPLATES, p) for p in test_pairs]
    shifted = [_arith_example(rng, ARITH_TEMPLATES_SHIFTED, (rng.randint(50, 99), rng.randint(50, 99)))
               for _ in range(n_test)]
    return Task("builtin:arith", "arithmetic word problems, exact-match number",
                {"train": train, "test": test, "shifted": shifted}, max_new_tokens=6)


# ---------------------------------------------------------------- builtin:listops

LIST_INSTRUCTIONS = {
    "reverse": "Reverse the list {x}.",
    "sort": "Sort the list {x} in increasing order.",
    "first": "What is the first item of the list {x}?",
    "last": "What is the last item of the list {x}?",
    "max": "What is the largest item of the list {x}?",
    "min": "What is the smallest item of the list {x}?",
    "length": "How many items are in the list {x}?",
}


def _listops_example(rng: random.Random, lengths: tuple[int, int]) -> Example:
    from ..base.corpus import LIST_OPS, random_items, spaced

    op = rng.choice(sorted(LIST_INSTRUCTIONS))
    xs = random_items(rng, rng.randint(*lengths), letters=rng.random() < 0.4)
    return _qa(LIST_INSTRUCTIONS[op].format(x=spaced(xs)), LIST_OPS[op][0](xs))


def listops(seed: int = 0, n_train: int = 2000, n_test: int = 300) -> Task:
    rng = random.Random(f"listops-{seed}")
    train: list[Example] = []
    while len(train) < n_train:
        train.append(_listops_example(rng, (3, 5)))
    seen = {e.prompt for e in train}
    test: list[Example] = []
    while len(test) < n_test:  # same lengths, inputs never seen in train
        ex = _listops_example(rng, (3, 5))
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            test.append(ex)
    shifted = [_listops_example(rng, (6, 8)) for _ in range(n_test)]
    return Task("builtin:listops", "instructions on lists of digits and letters, exact match",
                {"train": train, "test": test, "shifted": shifted}, max_new_tokens=12)


# ---------------------------------------------------------------- registry and forgetting

_TASKS = {"arith": arith, "listops": listops, "world": world}


def register_task(name: str, factory) -> None:
    """``factory(seed) -> Task``; available as ``builtin:NAME``."""
    _TASKS[name] = factory


def list_tasks() -> list[str]:
    return [TASK_PREFIX + k for k in sorted(_TASKS)]


def get_task(name: str, seed: int = 0) -> Task:
    key = name[len(TASK_PREFIX):] if name.startswith(TASK_PREFIX) else name
    if key not in _TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(list_tasks())}")
    return _TASKS[key](seed)


def heldout_pretraining_texts() -> list[str]:
    """The held-out documents of ``builtin:base``'s recipe: same distribution as its corpus, never trained on."""
    from ..base.build import RECIPE
    from ..base.corpus import CorpusConfig, heldout_texts

    cfg = CorpusConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in RECIPE["corpus"].items()})
    return heldout_texts(cfg, RECIPE["heldout"]["n_docs"], RECIPE["heldout"]["seed"])


def forgetting(model, tokenizer, texts: list[str] | None = None, n_docs: int | None = None) -> float:
    """Mean next-token loss on held-out pretraining text (default: :func:`heldout_pretraining_texts`, all 300
    documents, or the first ``n_docs`` of them).
    Call it before and after fine-tuning: forgetting = after - before (positive: the model forgot)."""
    from ..base.build import text_loss

    texts = texts if texts is not None else heldout_pretraining_texts()
    return text_loss(model, tokenizer, texts[:n_docs] if n_docs else texts)
