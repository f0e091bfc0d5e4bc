"""``leantune bench --suite survey``: a row for every configuration of the survey's line-up (run on a tiny model
for 21 steps: Light-PEFT estimates for 20, then prunes; the jobs run in this process), labels unique within a run, the PEFT rows' impl and label, and rows whose
method this install lacks reported as such."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from leantune.measure import bench
from leantune.measure.bench import Budget, TimingPlan, entry_for_name, parse_efficiency_model, resolve_entries
from leantune.measure.suite import SURVEY, suite_config, suite_entries

pytest.importorskip("peft")

TINY_EFF = ("hidden=32,layers=2,heads=4,kv_heads=2,intermediate=64,vocab=64,seq_len=16,batch_size=2,"
            "prompt_tokens=4,new_tokens=2")


def test_survey_line_up_is_the_surveys_16_and_leantunes_4():
    labels = [e["label"] for e in SURVEY]
    assert len(labels) == 20 == len(set(labels))
    assert labels[:16] == ["full", "houlsby", "pfeiffer", "scaled_parallel", "ln_tuning", "lora_qv", "lora_all",
                           "krona", "compacter", "compacter_pp", "ia3", "mam", "prefix_tuning", "prefix_flat",
                           "unipelt", "peft:lora"]
    assert labels[16:] == ["bitfit", "s2ft", "lisa", "light_peft"]
    runs, _, _ = resolve_entries(suite_entries("survey"), strict=False, lrs=bench.TUNED_LRS["builtin:base"])
    by = {r["label"]: r for r in runs}
    assert by["lora_qv"]["options"]["targets"] == "q,v" and by["lora_all"]["options"]["targets"] == "all-linear"
    assert by["lora_qv"]["lr"] == by["lora_all"]["lr"] == by["peft:lora"]["lr"] == bench.TUNED_LRS["builtin:base"]["lora"]
    assert len({r["key"] for r in runs}) == len(runs)


def test_labels_must_be_unique():
    twice = [entry_for_name("lora"), {**entry_for_name("bitfit"), "label": "lora"}]
    with pytest.raises(ValueError, match="twice"):
        resolve_entries(twice)


def test_peft_types_are_bridge_rows_and_peft_lora_stays_the_anchor():
    runs, _ = bench.resolve_runs(["peft:lora", "peft:loha"])
    assert [(r["label"], r["method"], r["impl"]) for r in runs] == [("peft:lora", "lora", "peft"),
                                                                    ("peft:loha", "peft", "peft")]
    assert runs[1]["options"] == {"peft_type": "LOHA"} and runs[1]["key"] == "peft_loha@peft"
    with pytest.raises(ValueError, match="not a PEFT type"):
        bench.resolve_runs(["peft:bitfit"])


def test_quick_suite_preset_is_one_task_and_the_cli_flags_apply():
    cfg = bench.config_from_options(quick=True, max_steps=2, preset=suite_config("survey", quick=True))
    assert cfg.tasks == ["builtin:world"] and cfg.budget.seeds == 1 and cfg.budget.max_steps == 2
    assert cfg.output_dir == "bench-survey-quick" and cfg.suite == "survey" and len(cfg.entries) == 20
    assert suite_config("survey").tasks == ["builtin:world", "builtin:listops", "builtin:arith"]
    with pytest.raises(ValueError, match="line-up"):
        bench.config_from_options(methods="lora", preset=suite_config("survey"))


def _in_process(monkeypatch):
    from leantune.measure.run import JOBS

    def run_job(job, spec, work, name, progress, total_steps=None):
        work.mkdir(parents=True, exist_ok=True)
        return json.loads(json.dumps(JOBS[job](spec)))  # as a child's OUT.json would give it back

    monkeypatch.setattr(bench, "run_job", run_job)


def tiny_suite(tmp_path, monkeypatch, tasks, extra=()):
    _in_process(monkeypatch)
    cfg = replace(suite_config("survey", quick=True), base="builtin:tiny-llama", tasks=tasks,
                  budget=Budget(max_steps=21, batch_size=2, seeds=1, eval_samples=2),
                  timing=TimingPlan(warmup_rounds=0, rounds=1, infer_warmup_rounds=0, infer_rounds=1),
                  efficiency_model=parse_efficiency_model(TINY_EFF), output_dir=str(tmp_path / "out"), threads=1)
    cfg = replace(cfg, entries=cfg.entries + [entry_for_name(x) for x in extra])
    return cfg, bench.run_bench(cfg)


def test_tiny_survey_has_a_row_for_every_configuration(tmp_path, monkeypatch):
    cfg, (res, failed) = tiny_suite(tmp_path, monkeypatch, ["builtin:arith"], extra=["peft:loha"])
    assert not failed, failed
    measured = {r["label"] for r in res["runs"]}
    missing = {u["label"] for u in res["unavailable"]}
    assert measured | missing == {e["label"] for e in cfg.entries} and not measured & missing
    assert res["suite"] == "survey" and len(res["runs"]) == len(measured)  # one seed: labels unique in the run
    for u in res["unavailable"]:
        assert u["reason"] == "not registered in this install"
    rows = {r["label"]: r for r in res["runs"]}
    assert (rows["peft:loha"]["method"], rows["peft:loha"]["impl"]) == ("peft", "peft")
    assert (rows["peft:lora"]["method"], rows["peft:lora"]["impl"]) == ("lora", "peft")
    assert rows["lora_qv"]["trainable_params"] < rows["lora_all"]["trainable_params"]
    md = (tmp_path / "out" / "results.md").read_text()
    section = md[md.index("## The survey's axes"):]
    for label in measured:
        assert f"\n| {label} | " in section
    for label in missing:
        assert f"\n| {label} | – | method not available in this build" in section
    assert (tmp_path / "out" / "accuracy_vs_peak_memory.png").stat().st_size > 0


def test_several_tasks_rank_each_task_and_the_mean(tmp_path, monkeypatch):
    from leantune.measure.report import ranking

    per_task = {t: {"runs": [{"label": lbl, "quality": {"accuracy": a}} for lbl, a in accs.items()]}
                for t, accs in {"w": {"a": 0.9, "b": 0.5, "c": 0.5}, "x": {"a": 0.1, "b": 0.7, "c": 0.3}}.items()}
    rank = ranking(per_task)
    assert rank["rank"] == {"w": {"a": 1, "b": 2, "c": 2}, "x": {"a": 3, "b": 1, "c": 2}}
    assert rank["mean_accuracy"] == pytest.approx({"a": 0.5, "b": 0.6, "c": 0.4})
    assert rank["order"] == ["b", "a", "c"]


def test_several_tasks_write_a_folder_each_and_the_ranking(tmp_path, monkeypatch):
    _in_process(monkeypatch)
    entries = [entry_for_name("lora"), entry_for_name("bitfit"), {**entry_for_name("lora"), "label": "nope",
                                                                 "method": "not_a_method"}]
    cfg = replace(suite_config("survey"), entries=entries, base="builtin:tiny-llama",
                  tasks=["builtin:arith", "builtin:listops"], budget=Budget(max_steps=2, batch_size=2, seeds=1,
                                                                             eval_samples=2),
                  timing=TimingPlan(warmup_rounds=0, rounds=1, infer_warmup_rounds=0, infer_rounds=1),
                  efficiency_model=parse_efficiency_model(TINY_EFF), output_dir=str(tmp_path), threads=1)
    per_task, failed = bench.run_bench(cfg)
    assert not failed and set(per_task) == {"builtin:arith", "builtin:listops"}
    for folder in ("arith", "listops"):
        res = json.loads((tmp_path / folder / "results.json").read_text())
        assert [r["label"] for r in res["runs"]] == ["lora", "bitfit"]
    top = json.loads((tmp_path / "results.json").read_text())
    assert top["tasks"] == ["builtin:arith", "builtin:listops"] and sorted(top["ranking"]["order"]) == ["bitfit", "lora"]
    assert [u["label"] for u in top["unavailable"]] == ["nope"]
    md = (tmp_path / "results.md").read_text()
    assert "| nope | method not available in this build |" in md and "(arith/results.md)" in md
