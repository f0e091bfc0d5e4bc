"""The built-in pretrained base (`builtin:base`), its corpus, its recipe, and the task suite."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from leantune.base import ASSETS_DIR, base_info, load_base
from leantune.base import build as base_build
from leantune.base.corpus import (
    ATTRIBUTES,
    FACT_TEMPLATES,
    LIST_OPS,
    CorpusConfig,
    CorpusStream,
    biography,
    heldout_texts,
    make_world,
)
from leantune.data.tasks import (
    ARITH_TEMPLATES,
    ARITH_TEMPLATES_SHIFTED,
    WORLD_QUESTIONS,
    WORLD_QUESTIONS_SHIFTED,
    forgetting,
    get_task,
    heldout_pretraining_texts,
    list_tasks,
    world_split,
)

# The recorded held-out loss is recomputed from the same fp16 weights on the same text; only the order of float
# reductions (thread count, CPU kernels) may differ, which moves a mean cross-entropy by far less than this.
HELDOUT_LOSS_TOLERANCE = 1e-3

# A tiny recipe for testing the build pipeline end to end in seconds.
TINY_RECIPE = {
    "tokenizer": {"vocab_size": 300, "n_docs": 300},
    "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 8},
    "train": {"steps": 3, "batch_size": 4, "seq_len": 32, "warmup": 1},
    "heldout": {"n_docs": 12},
}


@pytest.fixture(scope="module")
def base():
    return load_base()


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_base")
    info = base_build.build_base(out, seed=0, progress=False, log_every=1000, **TINY_RECIPE)
    return out, info


def _template_of(prompt: str, name: str) -> str:
    return prompt.replace(name, "{n}")


# ---------------------------------------------------------------- shipped weights


def test_shipped_weights_carry_the_current_recipe_hash():
    assert base_info()["recipe_hash"] == base_build.recipe_hash(), (
        "the shipped base was built from another recipe or corpus version: rebuild it with `leantune base build`"
    )


def test_shipped_weights_reach_the_recorded_heldout_loss(base):
    model, tokenizer = base
    recorded = base_info()["heldout_loss"]
    assert forgetting(model, tokenizer) == pytest.approx(recorded, abs=HELDOUT_LOSS_TOLERANCE)


def test_shipped_weights_beat_an_untrained_model_on_heldout_text(base):
    model, tokenizer = base
    fresh = base_build.make_model(tokenizer, base_build.RECIPE["model"], seed=0)
    texts = heldout_pretraining_texts()[:64]
    assert base_build.text_loss(model, tokenizer, texts) < 0.3 * base_build.text_loss(fresh, tokenizer, texts)


def test_shipped_weights_are_fp16_on_disk():
    from safetensors import safe_open

    with safe_open(str(ASSETS_DIR / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}


def test_builtin_base_loads_offline_and_is_llama_with_gqa(monkeypatch):
    from leantune import load_model
    from leantune.anatomy import anatomy

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    model, tokenizer = load_model("builtin:base")
    anat = anatomy(model)
    assert model.config.model_type == "llama"
    assert anat.n_kv_heads < anat.n_heads and anat.n_heads % anat.n_kv_heads == 0
    assert len(anat.linears(["gate", "up", "down"])) == 3 * len(anat.blocks)  # SwiGLU
    assert 3_000_000 <= sum(p.numel() for p in model.parameters()) <= 8_000_000
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token_id is not None and tokenizer.bos_token_id is not None
    assert tokenizer.eos_token_id is not None and len(tokenizer) == model.config.vocab_size


def test_missing_assets_give_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*leantune base build"):
        load_base(tmp_path)


def test_the_base_knows_facts_of_its_world(base):
    """The pretraining worked: given a biography's opening, the base completes a fact it was taught."""
    from leantune.data.evaluate import greedy_generate

    model, tokenizer = base
    people = make_world()[:40]
    prompts = [f" {e.name} lives in" for e in people]  # documents are trained with a leading space
    outs = greedy_generate(model, tokenizer, prompts, max_new_tokens=3)
    hits = sum(o.strip().startswith(e.facts["city"]) for o, e in zip(outs, people, strict=True))
    assert hits / len(people) > 0.5  # chance is 1/20


# ---------------------------------------------------------------- the recipe and the build


def test_recipe_hash_follows_the_recipe_and_the_corpus_version(monkeypatch):
    default = base_build.recipe_hash()
    assert base_build.recipe_hash(base_build.make_recipe()) == default
    assert base_build.recipe_hash(base_build.make_recipe(seed=1)) != default
    assert base_build.recipe_hash(base_build.make_recipe(train={"steps": 7})) != default
    monkeypatch.setattr(base_build, "CORPUS_VERSION", base_build.CORPUS_VERSION + 1)
    assert base_build.recipe_hash() != default


def test_make_recipe_rejects_unknown_keys():
    with pytest.raises(ValueError, match="stepz"):
        base_build.make_recipe(train={"stepz": 3})
    with pytest.raises(ValueError, match="optimizer"):
        base_build.make_recipe(optimizer={"lr": 1.0})


def test_build_writes_a_loadable_base_with_its_hash_and_heldout_loss(tiny_build):
    out, info = tiny_build
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.json"} <= {p.name for p in out.iterdir()}
    recorded = json.loads((out / "recipe.json").read_text())
    assert recorded["recipe_hash"] == base_build.recipe_hash(base_build.make_recipe(0, **TINY_RECIPE))
    assert recorded["steps"] == 3 and recorded["seconds"] > 0
    model, tokenizer = load_base(out)
    cfg = base_build.CorpusConfig()
    texts = heldout_texts(cfg, TINY_RECIPE["heldout"]["n_docs"], base_build.RECIPE["heldout"]["seed"])
    assert base_build.text_loss(model, tokenizer, texts) == pytest.approx(info["heldout_loss"],
                                                                          abs=HELDOUT_LOSS_TOLERANCE)


def test_tokenizer_training_is_deterministic_and_round_trips():
    docs = CorpusStream(CorpusConfig(), seed=0).docs(300)
    a = base_build.train_tokenizer(docs, 300)
    b = base_build.train_tokenizer(docs, 300)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    for text in docs[:20]:
        assert a.decode(a(text, add_special_tokens=False)["input_ids"]) == text


def test_base_tokenizer_splits_numbers_into_digits(base):
    _, tokenizer = base
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(" 1234 + 56", add_special_tokens=False)["input_ids"])
    digits = [p.replace("Ġ", "") for p in pieces if re.search(r"\d", p)]
    assert digits == ["1", "2", "3", "4", "5", "6"]


# ---------------------------------------------------------------- the corpus


def test_corpus_is_deterministic_for_a_seed():
    cfg = CorpusConfig()
    assert CorpusStream(cfg, seed=3).docs(50) == CorpusStream(cfg, seed=3).docs(50)
    assert CorpusStream(cfg, seed=3).docs(50) != CorpusStream(cfg, seed=4).docs(50)
    assert make_world(0) == make_world(0) and make_world(0) != make_world(1)


def test_world_has_unique_names_and_a_value_for_every_attribute():
    people = make_world()
    assert len({e.name for e in people}) == len(people) == CorpusConfig().n_entities
    for e in people:
        assert set(e.facts) == set(ATTRIBUTES) and all(e.facts[a] in ATTRIBUTES[a] for a in ATTRIBUTES)


def test_biographies_state_every_fact_in_varied_phrasing_and_order():
    import random

    person = make_world()[0]
    rng = random.Random(0)
    bios = [biography(rng, person) for _ in range(60)]
    for bio in bios:
        sentences = [s for s in re.split(r"(?<=\.) ", bio) if s]
        assert len(sentences) == len(ATTRIBUTES)
        for attr, value in person.facts.items():
            forms = [t.format(n=person.name, v=value) for t in FACT_TEMPLATES[attr]]
            assert sum(s in forms for s in sentences) == 1, (attr, bio)
    firsts = {re.split(r"(?<=\.) ", b)[0] for b in bios}
    assert len(firsts) > len(ATTRIBUTES)  # different facts and phrasings open the biographies


def test_heldout_text_is_excluded_from_the_training_stream():
    cfg = CorpusConfig()
    first = CorpusStream(cfg, seed=0).next_doc()
    assert CorpusStream(cfg, seed=0, exclude={first}).next_doc() != first
    held = set(heldout_texts(cfg, 50, seed=12345))
    assert len(held) == 50
    assert held.isdisjoint(CorpusStream(cfg, seed=0, exclude=frozenset(held)).docs(2000))


def test_corpus_mixes_world_arithmetic_and_list_documents():
    docs = CorpusStream(CorpusConfig(), seed=0).docs(500)
    names = {e.name for e in make_world()}
    world = sum(any(d.startswith(n) or f" {n} " in d for n in names) for d in docs)
    arith = sum(bool(re.search(r"\d+ (\+|-|plus|minus) \d+", d)) for d in docs)
    lists = sum(any(w in d for w in ("reversed", "sorted", "item", "largest", "smallest", "length", "Sorting",
                                     "Reversing", "Counting", "maximum", "minimum", "biggest", "least",
                                     "starts with", "ends with", "front of", "end of", "becomes"))
                for d in docs)
    assert world > 300 and arith > 20 and lists > 20


# ---------------------------------------------------------------- the tasks


def test_task_names():
    assert {"builtin:world", "builtin:arith", "builtin:listops"} <= set(list_tasks())
    with pytest.raises(ValueError, match="builtin:nope"):
        get_task("builtin:nope")


@pytest.mark.parametrize("name", ["builtin:world", "builtin:arith", "builtin:listops"])
def test_tasks_are_deterministic_for_a_seed(name):
    assert get_task(name, seed=0).splits == get_task(name, seed=0).splits
    assert get_task(name, seed=0).splits != get_task(name, seed=1).splits


@pytest.mark.parametrize("name", ["builtin:world", "builtin:arith", "builtin:listops"])
def test_test_prompts_are_not_in_train(name):
    task = get_task(name)
    train = {e.prompt for e in task.split("train")}
    assert not train & {e.prompt for e in task.split("test")}
    assert all(task.split(s) for s in ("train", "test", "shifted"))


def test_world_test_people_are_disjoint_from_train_people_and_cover_the_other_half():
    train_people, test_people = world_split(seed=0)
    train_names, test_names = {e.name for e in train_people}, {e.name for e in test_people}
    assert not train_names & test_names
    assert train_names | test_names == {e.name for e in make_world()}
    task = get_task("builtin:world")
    for split, names in (("train", train_names), ("test", test_names), ("shifted", test_names)):
        for ex in task.split(split):
            assert any(n in ex.prompt for n in names)
            assert not any(n in ex.prompt for n in (train_names if names is test_names else test_names))


def test_world_answers_are_the_facts_of_the_pretraining_world():
    facts = {e.name: e.facts for e in make_world()}
    task = get_task("builtin:world")
    for ex in task.split("test") + task.split("shifted"):
        name = next(n for n in facts if n in ex.prompt)
        assert ex.response.strip() in facts[name].values()
    assert task.chance == pytest.approx(sum(1 / len(v) for v in ATTRIBUTES.values()) / len(ATTRIBUTES))


def test_world_shifted_split_uses_only_new_question_templates():
    task = get_task("builtin:world")
    people = {e.name for e in make_world()}

    def templates(split):
        return {_template_of(ex.prompt, next(n for n in people if n in ex.prompt)) for ex in task.split(split)}

    train, shifted = templates("train"), templates("shifted")
    assert not train & shifted
    assert train == {f"Question: {q} Answer:" for qs in WORLD_QUESTIONS.values() for q in qs}
    assert shifted <= {f"Question: {q} Answer:" for qs in WORLD_QUESTIONS_SHIFTED.values() for q in qs}


def _arith_reference(prompt: str, templates) -> int:
    a, b = (int(x) for x in re.findall(r"\d+", prompt))
    for template, op in templates:
        x, y = (b, a) if op == "-" and template.index("{b}") < template.index("{a}") else (a, b)
        if template.format(a=x, b=y) + " Answer:" == prompt:
            return x + y if op == "+" else x - y
    raise AssertionError(f"no template matches {prompt!r}")


def test_arith_answers_are_right_and_shifted_uses_other_templates_and_numbers():
    task = get_task("builtin:arith")
    for split, templates in (("train", ARITH_TEMPLATES), ("test", ARITH_TEMPLATES),
                             ("shifted", ARITH_TEMPLATES_SHIFTED)):
        for ex in task.split(split):
            assert int(ex.response) == _arith_reference(ex.prompt, templates) >= 0
    assert not {t for t, _ in ARITH_TEMPLATES} & {t for t, _ in ARITH_TEMPLATES_SHIFTED}
    assert max(int(x) for ex in task.split("train") for x in re.findall(r"\d+", ex.prompt)) < 50
    assert min(int(x) for ex in task.split("shifted") for x in re.findall(r"\d+", ex.prompt)) >= 50


def _list_of(prompt: str) -> list:
    items = re.search(r"list ((?:[0-9a-z] )*[0-9a-z])(?: in increasing order)?[.?]", prompt).group(1).split()
    return [int(x) if x.isdigit() else x for x in items]


def test_listops_answers_match_a_python_reference_and_shifted_inputs_are_longer():
    reference = {"Reverse": lambda xs: xs[::-1], "Sort": sorted, "first": lambda xs: xs[0],
                 "last": lambda xs: xs[-1], "largest": max, "smallest": min, "How many": len}
    task = get_task("builtin:listops")
    for ex in task.split("train") + task.split("shifted"):
        xs = _list_of(ex.prompt)
        fn = next(f for k, f in reference.items() if k in ex.prompt)
        want = fn(xs)
        assert ex.response == " " + (" ".join(map(str, want)) if isinstance(want, list) else str(want))
    assert max(len(_list_of(e.prompt)) for e in task.split("train")) <= 5
    assert min(len(_list_of(e.prompt)) for e in task.split("shifted")) >= 6
    assert set(LIST_OPS) == {"reverse", "sort", "first", "last", "max", "min", "length"}


def test_score_is_exact_match_after_whitespace_normalization():
    task = get_task("builtin:world")
    ex = task.split("test")[0]
    value = ex.response.strip()
    assert task.score(f"  {value} ", ex)
    assert not task.score(f"{value}.", ex)
    assert not task.score(f"{value} and more", ex)


def test_accuracy_is_the_fraction_of_exact_matches(monkeypatch):
    from leantune.data import evaluate

    task = get_task("builtin:arith")
    examples = task.split("test")[:8]
    answers = [e.response for e in examples[:6]] + [" 999", " nope"]  # 6 right, 2 wrong
    monkeypatch.setattr(evaluate, "greedy_generate", lambda model, tok, prompts, n, bs=32: answers)
    res = task.accuracy(model=None, tokenizer=None, split="test", limit=8)
    assert res["accuracy"] == pytest.approx(6 / 8) and res["n"] == 8


def test_forgetting_on_the_first_n_docs_is_the_loss_on_those_docs(base):
    model, tokenizer = base
    texts = heldout_pretraining_texts()
    assert len(texts) == base_build.RECIPE["heldout"]["n_docs"]
    assert forgetting(model, tokenizer, n_docs=10) == pytest.approx(base_build.text_loss(model, tokenizer, texts[:10]))
    assert forgetting(model, tokenizer, n_docs=10) != pytest.approx(forgetting(model, tokenizer, texts[10:20]))


def test_forgetting_rises_when_the_base_is_damaged(base):
    model, tokenizer = base
    texts = heldout_pretraining_texts()[:48]
    before = forgetting(model, tokenizer, texts)
    damaged = base_build.make_model(tokenizer, base_build.RECIPE["model"], seed=0)
    damaged.load_state_dict(model.state_dict())
    with torch.no_grad():
        damaged.model.layers[-1].mlp.down_proj.weight.zero_()  # the last block's FFN forgets everything
    assert forgetting(damaged, tokenizer, texts) > before + 0.1


# ---------------------------------------------------------------- the slow, opt-in rebuild


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LEANTUNE_SLOW") != "1", reason="rebuilds the base (about an hour): LEANTUNE_SLOW=1")
def test_rebuilding_the_base_gives_the_shipped_hash_and_tokenizer(tmp_path):
    info = base_build.build_base(tmp_path, seed=0, progress=False)
    shipped = base_info()
    assert info["recipe_hash"] == shipped["recipe_hash"]
    assert (tmp_path / "tokenizer.json").read_text() == (ASSETS_DIR / "tokenizer.json").read_text()
    # Same seed and data; only float reduction order (threads, kernels) differs between machines.
    assert info["heldout_loss"] == pytest.approx(shipped["heldout_loss"], abs=0.05)
