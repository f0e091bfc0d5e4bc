"""Built-in tasks, generated offline from a seed. Each has ``train``, ``test`` and ``shifted`` splits.

``builtin:arith``: short arithmetic word problems with an exact-match number answer. The test split uses number
pairs never seen in training; the shifted split uses other question templates and a larger number range.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from .encode import Example

TASK_PREFIX = "builtin:"


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class Task:
    name: str
    description: str
    splits: dict[str, list[Example]] = field(default_factory=dict)
    max_new_tokens: int = 8

    def split(self, name: str) -> list[Example]:
        if name not in self.splits:
            raise ValueError(f"task {self.name!r} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def score(self, prediction: str, example: Example) -> bool:
        """Exact match after whitespace normalization."""
        return normalize(prediction) == normalize(example.response)


_TEMPLATES = ["What is {a} plus {b}?", "Add {a} and {b}.", "What is {a} minus {b}?", "Subtract {b} from {a}."]
_SHIFTED = ["Compute {a} + {b}.", "How much is {a} take away {b}?", "Find the sum of {a} and {b}."]


def _arith_example(rng: random.Random, templates, lo: int, hi: int, pair=None) -> Example:
    t = rng.choice(templates)
    a, b = pair if pair is not None else (rng.randint(lo, hi), rng.randint(lo, hi))
    minus = "minus" in t or "Subtract" in t or "take away" in t
    if minus and b > a:
        a, b = b, a
    return Example(t.format(a=a, b=b) + " Answer:", f" {a - b if minus else a + b}")


def arith(seed: int = 0, n_train: int = 2000, n_test: int = 200) -> Task:
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(50) for b in range(50)]
    rng.shuffle(pairs)
    test_pairs, train_pairs = pairs[:n_test], pairs[n_test:]
    train = [_arith_example(rng, _TEMPLATES, 0, 49, train_pairs[i % len(train_pairs)]) for i in range(n_train)]
    test = [_arith_example(rng, _TEMPLATES, 0, 49, p) for p in test_pairs]
    shifted = [_arith_example(rng, _SHIFTED, 50, 99) for _ in range(n_test)]
    return Task("builtin:arith", "arithmetic word problems, exact-match number", {"train": train, "test": test,
                                                                                  "shifted": shifted})


_TASKS = {"arith": arith}


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
