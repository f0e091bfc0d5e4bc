"""LISA: the draw, optimizer state that follows the active blocks, gradients, resume, the Trainer bridge, I/O."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import leantune
from leantune.data import collate, encode_examples, get_task
from leantune.hooks import TrainHook
from leantune.methods.base import ConfigError
from leantune.methods.lisa import draw_blocks
from leantune.models import byte_tokenizer, load_model
from leantune.train.loop import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

# -- helpers ------------------------------------------------------------------------------------------------




def tiny_llama(layers: int = 4):
    """A LLaMA-style model with more blocks than the built-in one, so that draws of 2 of 4 blocks can vary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(byte_tokenizer()), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()


_DATA: dict[int, list[dict]] = {}


def data(n: int = 48) -> list[dict]:
    if n not in _DATA:
        examples = get_task("builtin:arith").split("train")[:n]
        _DATA[n] = encode_examples(byte_tokenizer(), examples, max_length=64)
    return _DATA[n]


def cfg(**kw) -> TrainConfig:
    base = {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "progress": False, "max_grad_norm": 1.0}
    return TrainConfig(**{**base, **kw})


def adamw_bytes(params) -> int:
    """What torch's AdamW keeps per fp32 parameter: exp_avg and exp_avg_sq (4 bytes an entry each) + a 4-byte
    float32 step counter."""
    return sum(2 * p.numel() * 4 + 4 for p in params)


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def block_changed(method, i: int, base: dict) -> bool:
    return any(not torch.equal(p, base[n]) for n, p in method.block_params[i].items())


class Probe(TrainHook):
    """Records, after every optimizer step, the active blocks and what the optimizer holds."""

    def __init__(self):
        self.rows = []

    def on_step_end(self, ctx):
        m, opt = ctx.method, ctx.optimizer
        active = [p for _, p in m.trainable_parameters()]
        self.rows.append({
            "step": ctx.step, "active": m.active,
            "state_ids": {id(p) for p in opt.state}, "group_ids": {id(p) for g in opt.param_groups for p in g["params"]},
            "active_ids": {id(p) for p in active}, "bytes": state_bytes(opt), "expected": adamw_bytes(active),
        })


class Stop(Exception):
    pass


class CrashAt(TrainHook):
    """Stops a run at the start of optimizer step ``at`` (a crash after the checkpoint of step ``at``)."""

    def __init__(self, at: int | None):
        self.at = at

    def on_step_begin(self, ctx):
        if self.at is not None and ctx.step == self.at:
            raise Stop


# -- the draw -----------------------------------------------------------------------------------------------


def test_draw_is_a_pure_function_of_seed_and_period():
    first = [draw_blocks(7, p, 8, 2) for p in range(50)]
    again = [draw_blocks(7, p, 8, 2) for p in reversed(range(50))][::-1]
    assert first == again
    assert first != [draw_blocks(8, p, 8, 2) for p in range(50)]
    a = leantune.apply(tiny_llama(), "lisa", gamma=2, seed=3)
    b = leantune.apply(tiny_llama(), "lisa", gamma=2, seed=3)
    assert [a.draw(p) for p in range(20)] == [b.draw(p) for p in range(20)] == [draw_blocks(3, p, 4, 2)
                                                                                for p in range(20)]


def test_draw_is_uniform_without_replacement():
    draws = [draw_blocks(0, p, 8, 3) for p in range(4000)]
    assert all(len(set(d)) == 3 and all(0 <= i < 8 for i in d) for d in draws)
    counts = torch.bincount(torch.tensor([i for d in draws for i in d]), minlength=8).float()
    # each block is drawn with probability 3/8: 1500 of 4000 periods, binomial sd about 31
    assert (counts - 1500).abs().max() < 150


# -- config ---------------------------------------------------------------------------------------------------


def test_always_on_parts_are_configurable_and_may_be_empty():
    model = tiny_llama()
    m = leantune.apply(model, "lisa", always_on="none", gamma=1)
    assert m.always_on == {}
    assert {n for n, _ in m.trainable_parameters()} == set(m.block_params[m.active[0]])
    assert not model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad
    m2 = leantune.apply(tiny_llama(), "lisa", always_on="head")
    assert set(m2.always_on) == {"lm_head.weight"}


def test_leantune_train_stays_a_function_after_applying_lisa():
    leantune.apply(tiny_llama(), "lisa")  # importing a leantune.train submodule later must not replace it
    assert callable(leantune.train) and leantune.train.__module__ == "leantune"


def test_bad_options_are_clear_errors():
    with pytest.raises(ConfigError, match="always_on has unknown part"):
        leantune.apply(tiny_llama(), "lisa", always_on="embed,lm_head")
    with pytest.raises(ConfigError, match="gamma=5 but this llama model has 4 blocks"):
        leantune.apply(tiny_llama(), "lisa", gamma=5)
    with pytest.raises(ConfigError, match="period"):
        leantune.apply(tiny_llama(), "lisa", period=0)


# -- optimizer state follows the active set ---------------------------------------------------------------


def test_optimizer_state_is_exactly_the_active_parameters_at_every_step():
    model = tiny_llama()
    method = leantune.apply(model, "lisa", gamma=2, period=2, seed=0)
    probe = Probe()
    train(model, data(), cfg(max_steps=8), hooks=[probe])
    assert len({r["active"] for r in probe.rows}) >= 3  # the run switched blocks
    for r in probe.rows:
        assert r["active"] == method.draw((r["step"] - 1) // 2)
        assert r["state_ids"] == r["active_ids"] == r["group_ids"]
        assert r["bytes"] == r["expected"]


def test_a_block_that_stays_active_keeps_its_moments_and_a_new_one_starts_fresh():
    model = tiny_llama()
    method = leantune.apply(model, "lisa", gamma=2, period=1, seed=0)  # draws (1, 3) then (0, 1)
    assert method.draw(0) == (1, 3) and method.draw(1) == (0, 1)
    seen = {}

    class Steps(TrainHook):
        def on_step_begin(self, ctx):  # runs after LISA's hook: the optimizer is already rebuilt
            if ctx.step == 1:
                seen.update({n: ctx.optimizer.state[p]["step"].item() if p in ctx.optimizer.state else None
                             for n, p in ctx.method.trainable_parameters()})

    train(model, data(), cfg(max_steps=2), hooks=[Steps()])
    assert all(seen[n] == 1.0 for n in method.block_params[1])  # stayed: one step of moments
    assert all(seen[n] is None for n in method.block_params[0])  # joined: no state yet
    assert all(seen[n] == 1.0 for n in method.always_on)


def test_frozen_blocks_have_no_grad_and_active_grads_equal_full_fine_tuning():
    batch = collate(data()[:4], 0)
    full_model, lisa_model = tiny_llama(), tiny_llama()
    leantune.apply(full_model, "full")
    method = leantune.apply(lisa_model, "lisa", gamma=2, seed=0)
    for model in (full_model, lisa_model):
        model(**batch).loss.backward()
    full = dict(full_model.named_parameters())
    for n, p in method.trainable_parameters():
        torch.testing.assert_close(p.grad, full[n].grad, rtol=1e-5, atol=1e-7)
    frozen = [i for i in range(4) if i not in method.active]
    assert frozen and all(p.grad is None for i in frozen for p in method.block_params[i].values())
    old = method.active
    method.activate((0, 2) if old != (0, 2) else (1, 3))  # a switch drops the leaving blocks' gradients
    assert all(p.grad is None for i in old if i not in method.active for p in method.block_params[i].values())


def test_every_block_trains_over_enough_periods_and_undrawn_blocks_stay_base():
    model = tiny_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = leantune.apply(model, "lisa", gamma=1, period=1, seed=0)
    first = method.draw(0)[0]
    train(model, data(), cfg(max_steps=1))
    assert [block_changed(method, i, base) for i in range(4)] == [i == first for i in range(4)]
    steps = next(s for s in range(1, 100) if {method.draw(p)[0] for p in range(s)} == {0, 1, 2, 3})
    model2 = tiny_llama()
    method2 = leantune.apply(model2, "lisa", gamma=1, period=1, seed=0)
    train(model2, data(), cfg(max_steps=steps))
    assert all(block_changed(method2, i, base) for i in range(4))
    assert method2.changed == {0, 1, 2, 3}


def test_gradient_accumulation_switches_only_at_optimizer_step_boundaries():
    model = tiny_llama()
    method = leantune.apply(model, "lisa", gamma=1, period=1, seed=0)
    micro = []

    class PerMicroBatch(TrainHook):
        def extra_loss(self, ctx):  # called once per micro-batch, before its backward
            trains = tuple(i for i in range(4) if next(iter(method.block_params[i].values())).requires_grad)
            micro.append((ctx.step, method.active, trains))
            return None

    train(model, data(), cfg(max_steps=5, batch_size=2, grad_accum=3), hooks=[PerMicroBatch()])
    assert len(micro) == 15
    for step in range(5):
        rows = [r for r in micro if r[0] == step]
        assert len(rows) == 3 and {r[1] for r in rows} == {r[2] for r in rows} == {method.draw(step)}
    assert len({r[1] for r in micro}) > 1


def test_bf16_autocast_and_cosine_schedule_keep_working():
    model = tiny_llama()
    leantune.apply(model, "lisa", gamma=1, period=2)
    probe = Probe()
    res = train(model, data(), cfg(max_steps=4, mixed_precision="bf16", lr_schedule="cosine", warmup_steps=1),
                hooks=[probe])
    assert all(r["bytes"] == r["expected"] for r in probe.rows)
    assert [round(h["lr"], 8) for h in res.history][:2] == [1e-3, 1e-3]  # warmup 1 step, then cosine from the top
    assert res.history[-1]["lr"] < res.history[1]["lr"]


# -- resume ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [4, 3], ids=["mid-period", "at-boundary"])
def test_resumed_run_draws_the_same_blocks_and_ends_with_the_same_weights(tmp_path, stop):
    run = cfg(max_steps=8, save_every=stop, lr_schedule="linear")  # the LR depends on max_steps: same in both runs
    ref_model = tiny_llama()
    ref = leantune.apply(ref_model, "lisa", gamma=2, period=3, seed=0)
    ref_probe = Probe()
    train(ref_model, data(), run, hooks=[CrashAt(None), ref_probe])
    assert ref.draw(0) != ref.draw(1) != ref.draw(2)

    model = tiny_llama()
    leantune.apply(model, "lisa", gamma=2, period=3, seed=0)
    first = Probe()
    with pytest.raises(Stop):
        train(model, data(), replace(run, output_dir=str(tmp_path)), hooks=[CrashAt(stop), first])
    resumed_model = tiny_llama()
    resumed = leantune.apply(resumed_model, "lisa", gamma=2, period=3, seed=0)
    second = Probe()
    train(resumed_model, data(), replace(run, output_dir=str(tmp_path)), hooks=[CrashAt(None), second])

    assert [r["step"] for r in second.rows] == list(range(stop + 1, 9))
    assert [r["active"] for r in first.rows + second.rows] == [r["active"] for r in ref_probe.rows]
    assert [r["bytes"] for r in second.rows] == [r["bytes"] for r in ref_probe.rows[stop:]]
    ref_params = dict(ref_model.named_parameters())
    for n, p in resumed_model.named_parameters():
        assert torch.equal(p, ref_params[n]), n
    assert resumed.changed == ref.changed


def test_resume_with_other_lisa_options_is_refused(tmp_path):
    run = cfg(max_steps=6, save_every=2, output_dir=str(tmp_path))
    model = tiny_llama()
    leantune.apply(model, "lisa", gamma=2, period=2, seed=0)
    with pytest.raises(Stop):
        train(model, data(), run, hooks=[CrashAt(4)])
    other = tiny_llama()
    leantune.apply(other, "lisa", gamma=2, period=2, seed=4)  # seed 4 draws (1, 2) then (0, 3): not seed 0's
    with pytest.raises(ValueError, match="resume with the LISA options the run started with"):
        train(other, data(), run, hooks=[CrashAt(None)])


# -- checkpoint: the changed blocks plus the always-on parts -----------------------------------------------


def test_save_holds_only_changed_blocks_and_load_puts_them_on_the_base(tmp_path):
    model = tiny_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = leantune.apply(model, "lisa", gamma=1, period=2, seed=0)
    drawn = {method.draw(0)[0], method.draw(1)[0]}
    assert len(drawn) == 2  # two of the four blocks train in 4 steps
    train(model, data(), cfg(max_steps=4))
    assert method.changed == drawn
    leantune.save(model, tmp_path / "a")
    keys = set(load_file(tmp_path / "a" / "adapter.safetensors"))
    expected = {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    expected |= {n for n, _ in model.named_parameters() if n.startswith(tuple(f"model.layers.{i}." for i in drawn))}
    assert keys == expected
    numel = sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert method.num_changed() == numel
    assert json.loads((tmp_path / "a" / "leantune.json").read_text())["changed_params"] == numel
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n not in expected)

    fresh = tiny_llama()
    loaded = leantune.load(fresh, tmp_path / "a")
    trained = dict(model.named_parameters())
    for n, p in fresh.named_parameters():
        assert torch.equal(p, trained[n]), n
    assert loaded.changed == drawn and loaded.num_changed() == numel


def test_load_refuses_a_block_saved_in_part():
    model = tiny_llama()
    method = leantune.apply(model, "lisa", gamma=1)
    state = method.state()
    del state[next(n for n in state if n.startswith("model.layers."))]
    with pytest.raises(ValueError, match="missing"):
        leantune.apply(tiny_llama(), "lisa", gamma=1).load_state(state)


def test_remove_restores_the_base_bitwise_with_keep_base():
    model = tiny_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = leantune.apply(model, "lisa", gamma=1, period=1, keep_base=True)
    assert method.capabilities.restores_base and method.capabilities.needs_schedule
    train(model, data(), cfg(max_steps=4))
    assert len(method.changed) >= 2
    assert set(method.snapshot) == set(method.state())  # a copy of only what training changed
    leantune.remove(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), n


def test_remove_without_keep_base_is_a_clear_error():
    model = tiny_llama()
    method = leantune.apply(model, "lisa")
    assert not method.capabilities.restores_base
    with pytest.raises(RuntimeError, match="keep_base"):
        leantune.remove(model)


# -- every family ------------------------------------------------------------------------------------------


FAMILY_ALWAYS_ON = {
    "tiny-llama": {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"},
    "tiny-gpt2": {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                  "transformer.ln_f.bias"},  # lm_head is tied to wte
    "tiny-bert": {"bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                  "bert.embeddings.token_type_embeddings.weight", "cls.predictions.bias"},  # decoder tied
}


@pytest.mark.parametrize("name", sorted(FAMILY_ALWAYS_ON))
def test_every_family_trains_with_state_only_for_active_blocks(name):
    model, _ = load_model(f"builtin:{name}")
    method = leantune.apply(model, "lisa", gamma=1, period=1, seed=0)
    assert method.n_blocks == 2 and set(method.always_on) == FAMILY_ALWAYS_ON[name]
    probe = Probe()
    train(model, data(), cfg(max_steps=3), hooks=[probe])
    assert {r["active"] for r in probe.rows} == {(0,), (1,)}
    assert all(r["state_ids"] == r["active_ids"] and r["bytes"] == r["expected"] for r in probe.rows)


def test_rest_adds_everything_outside_the_blocks():
    model, _ = load_model("builtin:tiny-bert")
    method = leantune.apply(model, "lisa", always_on="rest")
    blocks = {n for b in method.block_params for n in b}
    assert set(method.always_on) == {n for n, _ in model.named_parameters()} - blocks
    assert "cls.predictions.transform.dense.weight" in method.always_on


# -- the Hugging Face Trainer bridge ---------------------------------------------------------------------


def _trainer(model, tmp_path, callbacks, **kw):
    from transformers import Trainer, TrainingArguments

    kw = {"max_steps": 6, "save_strategy": "no", **kw}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
                             use_cpu=True, disable_tqdm=True, logging_steps=100, seed=0, **kw)
    return Trainer(model=model, args=args, train_dataset=data(), data_collator=lambda f: collate(f, 0),
                   callbacks=callbacks)


def trainer_recorder(method, rows):
    """A Trainer callback that records, after every optimizer step, the active blocks and the optimizer's state."""
    from transformers import TrainerCallback

    class Rec(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            active = [p for _, p in method.trainable_parameters()]
            rows.append((state.global_step, method.active, {id(p) for p in optimizer.state},
                         {id(p) for p in active}, state_bytes(optimizer), adamw_bytes(active),
                         {id(p) for g in optimizer.param_groups for p in g["params"]}))

    return Rec()


def test_trainer_bridge_keeps_optimizer_state_only_for_the_active_blocks(tmp_path):
    from leantune.train.hf import LisaCallback

    model, _ = load_model("builtin:tiny-llama")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = leantune.apply(model, "lisa", gamma=1, period=2, seed=0)  # periods 0, 1, 2 draw 1, 0, 0
    rows = []
    _trainer(model, tmp_path, [LisaCallback(), trainer_recorder(method, rows)]).train()
    candidates = {id(p) for p in method.candidate_parameters()}
    assert [r[1] for r in rows] == [(1,), (1,), (0,), (0,), (0,), (0,)]
    for _, _, state_ids, active_ids, got, expected, group_ids in rows:
        assert state_ids == active_ids and got == expected
        assert group_ids == candidates  # every block is in the optimizer: none left out (LMFlow#726)
    assert all(block_changed(method, i, base) for i in (0, 1))


@pytest.mark.parametrize("save", [3, 2], ids=["mid-period", "at-boundary"])
def test_trainer_bridge_resume_gives_the_same_weights(tmp_path, save):
    from leantune.train.hf import LisaCallback

    ref_model, _ = load_model("builtin:tiny-llama")
    leantune.apply(ref_model, "lisa", gamma=1, period=2, seed=0)
    _trainer(ref_model, tmp_path / "ref", [LisaCallback()]).train()

    model, _ = load_model("builtin:tiny-llama")
    leantune.apply(model, "lisa", gamma=1, period=2, seed=0)
    _trainer(model, tmp_path / "run", [LisaCallback()], save_strategy="steps", save_steps=save).train()
    resumed, _ = load_model("builtin:tiny-llama")
    method = leantune.apply(resumed, "lisa", gamma=1, period=2, seed=0)
    checkpoint = tmp_path / "run" / f"checkpoint-{save}"
    rows = []
    _trainer(resumed, tmp_path / "run", [LisaCallback(), trainer_recorder(method, rows)]).train(
        resume_from_checkpoint=str(checkpoint))
    assert [r[0] for r in rows] == list(range(save + 1, 7))
    assert all(state_ids == active_ids for _, _, state_ids, active_ids, *_ in rows)  # resumed state was pruned
    ref = dict(ref_model.named_parameters())
    for n, p in resumed.named_parameters():
        assert torch.equal(p, ref[n]), n
    assert method.changed == {0, 1}


def test_trainer_bridge_refuses_an_optimizer_that_misses_blocks(tmp_path):
    from leantune.train.hf import LisaCallback

    model, _ = load_model("builtin:tiny-llama")
    leantune.apply(model, "lisa", gamma=1)
    trainer = _trainer(model, tmp_path, [])
    trainer.add_callback(LisaCallback())  # too late to see the optimizer being built over every block
    with pytest.raises(ValueError, match="misses"):
        trainer.train()
