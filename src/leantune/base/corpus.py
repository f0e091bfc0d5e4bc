"""The built-in pretraining corpus, generated offline from a seed: a synthetic world, arithmetic, list operations.

(a) World: a few hundred invented people, each with a handful of attributes (city, job, pet, hobby). A document is
one person's biography: every fact in a randomly chosen paraphrase, the facts in shuffled order, the full name in
every sentence. Varied phrasing is what lets a model extract the facts later (Allen-Zhu & Li, "Physics of Language
Models 3.1"); without it a model memorizes the text but cannot answer questions about it.
(b) Arithmetic: sums and differences of small numbers, written in digits, in words and in sentences.
(c) List and string operations: reverse, sort, first, last, largest, smallest, length of lists of digits and of
spelled-out letters.

Everything here is a pure function of its seed. Bump ``CORPUS_VERSION`` whenever the generated text changes: the
base model's recipe hash includes it, so shipped weights built from an older corpus are detected.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CORPUS_VERSION = 1
WORLD_SEED = 0  # the world the shipped base model was trained on; tasks ask about this one

_ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
           "tr", "st", "sh", "th", "ch", "j", "w"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "m", "th", "k", "x"]

ATTRIBUTES: dict[str, list[str]] = {
    "city": ["Ashford", "Brimvale", "Coldwater", "Dunmore", "Eastwick", "Fairhaven", "Glenrock", "Highmoor",
             "Ironbridge", "Kingsford", "Lakemont", "Millbrook", "Northgate", "Oakridge", "Pinecrest", "Redcliff",
             "Silverton", "Thornbury", "Westfield", "Yarrow"],
    "job": ["baker", "carpenter", "dentist", "engineer", "farmer", "gardener", "journalist", "lawyer",
            "librarian", "mechanic", "musician", "nurse", "painter", "pharmacist", "pilot", "plumber", "sailor",
            "teacher", "tailor", "veterinarian"],
    "pet": ["cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "ferret", "canary", "lizard",
            "pony", "snake"],
    "hobby": ["chess", "painting", "fishing", "hiking", "knitting", "pottery", "gardening", "cycling",
              "swimming", "archery", "juggling", "baking", "singing", "rowing", "climbing", "dancing"],
}

# Several phrasings of each fact ({n} = full name, {v} = value); the world task asks with other wordings.
FACT_TEMPLATES: dict[str, list[str]] = {
    "city": ["{n} lives in {v}.", "{n} has a home in the city of {v}.", "{n} resides in {v}."],
    "job": ["{n} works as a {v}.", "{n} earns a living as a {v}.", "By trade, {n} is a {v}."],
    "pet": ["{n} owns a {v}.", "{n} keeps a {v} as a pet.", "The pet of {n} is a {v}."],
    "hobby": ["{n} enjoys {v}.", "In free time, {n} likes {v}.", "The favorite hobby of {n} is {v}."],
}

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                "twenty"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Entity:
    name: str
    facts: dict[str, str]  # attribute -> value


@dataclass(frozen=True)
class CorpusConfig:
    world_seed: int = WORLD_SEED
    n_entities: int = 200
    mix: tuple[float, float, float] = (0.8, 0.1, 0.1)  # world, arithmetic, list/string documents
    max_number: int = 99  # arithmetic operands are 0..max_number
    list_lengths: tuple[int, int] = (2, 8)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def make_world(seed: int = WORLD_SEED, n_entities: int = 200) -> list[Entity]:
    """``n_entities`` people with unique invented full names and one value per attribute."""
    rng = random.Random(f"world-{seed}")
    names: set[str] = set()
    entities = []
    while len(entities) < n_entities:
        name = f"{_word(rng, rng.choice([1, 2])).capitalize()} {_word(rng, 2).capitalize()}"
        if name in names:
            continue
        names.add(name)
        entities.append(Entity(name, {a: rng.choice(vals) for a, vals in ATTRIBUTES.items()}))
    return entities


def biography(rng: random.Random, entity: Entity) -> str:
    facts = [rng.choice(FACT_TEMPLATES[a]).format(n=entity.name, v=v) for a, v in entity.facts.items()]
    rng.shuffle(facts)
    return " ".join(facts)


def number_text(rng: random.Random, x: int) -> str:
    """A number in digits, or in words when it is small (both forms appear in the corpus)."""
    return NUMBER_WORDS[x] if x < len(NUMBER_WORDS) and rng.random() < 0.3 else str(x)


_SUM_FORMS = ["{a} + {b} = {c}.", "{a} plus {b} is {c}.", "The sum of {a} and {b} is {c}.",
              "Adding {b} to {a} gives {c}.", "{a} and {b} make {c}."]
_DIFF_FORMS = ["{a} - {b} = {c}.", "{a} minus {b} is {c}.", "The difference of {a} and {b} is {c}.",
               "Taking {b} from {a} leaves {c}.", "{b} less than {a} is {c}."]


def arithmetic_doc(rng: random.Random, max_number: int = 99, lines: int = 4) -> str:
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, max_number), rng.randint(0, max_number)
        if rng.random() < 0.5:
            form, c = rng.choice(_SUM_FORMS), a + b
        else:
            a, b = max(a, b), min(a, b)
            form, c = rng.choice(_DIFF_FORMS), a - b
        words = rng.random() < 0.3  # one written form per line: all words (when small enough) or all digits
        fmt = (lambda x: NUMBER_WORDS[x]) if words and c < len(NUMBER_WORDS) and a < len(NUMBER_WORDS) else str
        out.append(form.format(a=fmt(a), b=fmt(b), c=fmt(c)))
    return " ".join(out)


def spaced(items) -> str:
    return " ".join(str(x) for x in items)


# Each op: (name, function of the item list, its phrasings with {x} = input and {y} = output).
LIST_OPS = {
    "reverse": (lambda xs: spaced(xs[::-1]),
                ["The reverse of {x} is {y}.", "{x} reversed is {y}.", "Reversing {x} gives {y}."]),
    "sort": (lambda xs: spaced(sorted(xs)),
             ["{x} sorted is {y}.", "Sorting {x} gives {y}.", "In order, {x} becomes {y}."]),
    "first": (lambda xs: str(xs[0]),
              ["The first item of {x} is {y}.", "{x} starts with {y}.", "At the front of {x} is {y}."]),
    "last": (lambda xs: str(xs[-1]),
             ["The last item of {x} is {y}.", "{x} ends with {y}.", "At the end of {x} is {y}."]),
    "max": (lambda xs: str(max(xs)),
            ["The largest of {x} is {y}.", "The maximum of {x} is {y}.", "Of {x} the biggest is {y}."]),
    "min": (lambda xs: str(min(xs)),
            ["The smallest of {x} is {y}.", "The minimum of {x} is {y}.", "Of {x} the least is {y}."]),
    "length": (lambda xs: str(len(xs)),
               ["The length of {x} is {y}.", "{x} has {y} items.", "Counting {x} gives {y}."]),
}


def random_items(rng: random.Random, length: int, letters: bool) -> list:
    return [rng.choice(LETTERS) for _ in range(length)] if letters else [rng.randint(0, 9) for _ in range(length)]


def listops_doc(rng: random.Random, lengths: tuple[int, int] = (2, 8), lines: int = 3) -> str:
    out = []
    for _ in range(lines):
        op = rng.choice(sorted(LIST_OPS))
        fn, forms = LIST_OPS[op]
        xs = random_items(rng, rng.randint(*lengths), letters=rng.random() < 0.4)
        out.append(rng.choice(forms).format(x=spaced(xs), y=fn(xs)))
    return " ".join(out)


class CorpusStream:
    """An endless, seeded stream of documents in the configured mix; ``exclude`` holds texts it never yields
    (the held-out set), so held-out text is never trained on."""

    def __init__(self, config: CorpusConfig, seed: int, exclude: set[str] | frozenset = frozenset()):
        self.config, self.exclude = config, exclude
        self.world = make_world(config.world_seed, config.n_entities)
        self.rng = random.Random(f"stream-{seed}")

    def next_doc(self) -> str:
        while True:
            doc = self._draw()
            if doc not in self.exclude:
                return doc

    def _draw(self) -> str:
        rng, c = self.rng, self.config
        kind = rng.choices(range(3), weights=c.mix)[0]
        if kind == 0:
            return biography(rng, rng.choice(self.world))
        if kind == 1:
            return arithmetic_doc(rng, c.max_number)
        return listops_doc(rng, c.list_lengths)

    def docs(self, n: int) -> list[str]:
        return [self.next_doc() for _ in range(n)]


def heldout_texts(config: CorpusConfig | None = None, n: int = 300, seed: int = 12345) -> list[str]:
    """Documents from the pretraining distribution that the build excludes from training (for the held-out loss
    and for measuring forgetting after fine-tuning). Unique, deterministic."""
    stream = CorpusStream(config or CorpusConfig(), seed=seed)
    seen: dict[str, None] = {}
    while len(seen) < n:
        seen.setdefault(stream.next_doc(), None)
    return list(seen)
