"""The training loop: accumulation, resume, NaN guard, schedules, precision, checkpointing, metrics."""

from __future__ import annotations

import json

import pytest
import torch

import leantune
from conftest import tiny
from leantune.data import encode_examples, get_task
from leantune.train import NonFiniteLossError, TrainConfig, TrainHook, train
from leantune.train.loop import lr_factor


def _data(tok, n=64):
    return encode_examples(tok, get_task("builtin:arith").split("train")[:n], 64)


def _run(method="full", options=None, seed=0, hooks=(), init_seed=None, **cfg):
    torch.manual_seed(seed if init_seed is None else init_seed)
    model, tok = tiny()
    leantune.apply(model, method, **(options or {}))
    kw = {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "progress": False, "seed": seed, **cfg}
    result = train(model, _data(tok), TrainConfig(**kw), pad_id=tok.pad_token_id, hooks=list(hooks))
    return model, result


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda s, k=k: f"{k}: {s}")


_CLIP = torch.nn.utils.clip_grad_norm_


def _step_gradients(monkeypatch, **cfg):
    """The gradients each optimizer step clips and applies (whole step, all micro-batches), and the history."""
    grads = []

    def record(params, *a, **k):
        grads.append([p.grad.detach().clone() for p in params])
        return _CLIP(params, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    _, result = _run(**cfg)
    return grads, result.history


def test_accumulation_gives_the_large_batch_gradient(monkeypatch):
    """batch 8 and batch 4 x accum 2 apply the same gradient (a loss scaled by the number of micro-batches, which
    AdamW and clipping would cancel in the weights, fails here) and log the same loss and gradient norm."""
    # one step: from the same weights (later steps start from weights that differ in the last bits, which AdamW's
    # division by small second moments magnifies)
    big, big_log = _step_gradients(monkeypatch, batch_size=8, grad_accum=1, max_steps=1)
    small, small_log = _step_gradients(monkeypatch, batch_size=4, grad_accum=2, max_steps=1)
    assert len(big) == len(small) == 1
    for a, b in zip(big[0], small[0], strict=True):
        assert (a - b).abs().max() <= 1e-6 * a.abs().max()
    assert small_log[0]["loss"] == pytest.approx(big_log[0]["loss"], rel=1e-6)
    assert small_log[0]["grad_norm"] == pytest.approx(big_log[0]["grad_norm"], rel=1e-6)


def test_accumulation_differs_from_fewer_examples():
    """Guards the test above: half the examples must give a different update."""
    big, _ = _run(batch_size=8, grad_accum=1)
    half, _ = _run(batch_size=4, grad_accum=1)
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(_params(big).values(), _params(half).values(),
                                                                       strict=True))


class _Interrupt(TrainHook):
    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, ctx):
        if ctx.step == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("method,options", [("lora", {"dropout": 0.1}), ("full", {})])
def test_resume_equals_uninterrupted(tmp_path, method, options):
    cfg = {"max_steps": 6, "save_every": 2, "warmup_steps": 2}
    straight, _ = _run(method, options, output_dir=str(tmp_path / "a"), **cfg)
    with pytest.raises(KeyboardInterrupt):
        _run(method, options, output_dir=str(tmp_path / "b"), hooks=[_Interrupt(5)], **cfg)
    assert (tmp_path / "b" / "checkpoints" / "step-00000004").is_dir()
    # a different initial LoRA draw: the checkpoint's tensors and RNG state must win
    resumed, result = _run(method, options, init_seed=123, output_dir=str(tmp_path / "b"), **cfg)
    _assert_same(_params(straight), _params(resumed))
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in result.history] == [5, 6]


def test_checkpoints_are_complete_and_pruned(tmp_path):
    _run("lora", max_steps=6, save_every=2, keep_checkpoints=2, output_dir=str(tmp_path))
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-00000004", "step-00000006"]
    for name in ckpts:
        files = {p.name for p in (tmp_path / "checkpoints" / name).iterdir()}
        assert {"leantune.json", "adapter.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"} <= files
    assert (tmp_path / "leantune.json").exists() and (tmp_path / "adapter.safetensors").exists()


class _PoisonAt(TrainHook):
    def __init__(self, step):
        self.step = step

    def extra_loss(self, ctx):
        return torch.tensor(float("nan")) if ctx.step == self.step else None


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4.*step-00000002"):
        _run("lora", max_steps=6, save_every=2, output_dir=str(tmp_path), hooks=[_PoisonAt(3)])
    assert (tmp_path / "checkpoints" / "step-00000002" / "trainer_state.json").exists()
    assert not (tmp_path / "leantune.json").exists()  # no final adapter from a failed run
    fresh, _ = tiny()
    leantune.load(fresh, tmp_path / "checkpoints" / "step-00000002")  # the kept checkpoint loads


def test_nonfinite_gradient_norm_stops_training():
    """A finite loss whose gradient overflows (an inf in one parameter's gradient) stops at that step."""

    class PoisonGrad(TrainHook):
        def on_train_begin(self, ctx):
            _, p = next(iter(ctx.method.trainable_parameters()))
            p.register_hook(lambda g: g * float("inf") if ctx.step == 1 else g)

    with pytest.raises(NonFiniteLossError, match=r"gradient norm is (inf|nan) at step 2"):
        _run("lora", hooks=[PoisonGrad()])


def test_checkpoint_keeps_the_fp16_gradient_scaler(tmp_path):
    """Exact resume under fp16: the scaler's scale and growth counter come back from the checkpoint."""
    from leantune.train import checkpoint as ckpt

    model, _ = tiny()
    method = leantune.apply(model, "lora", r=2)
    opt = torch.optim.AdamW([p for _, p in method.trainable_parameters()])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.load_state_dict({**scaler.state_dict(), "scale": 512.0, "_growth_tracker": 7})
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, [], keep=2, scaler=scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    ckpt.load_optimizer_and_rng(path, opt, fresh)
    assert fresh.state_dict() == scaler.state_dict()
    assert fresh.get_scale() == 512.0 and fresh.state_dict()["_growth_tracker"] == 7


def test_nan_without_checkpoint_says_so():
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet"):
        _run("lora", hooks=[_PoisonAt(0)])


def test_metrics_jsonl_has_loss_lr_tokens_per_s(tmp_path):
    _run("lora", max_steps=3, output_dir=str(tmp_path))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["loss"] > 0 and r["lr"] > 0 and r["tokens_per_s"] > 0


def test_loss_goes_down():
    _, result = _run("lora", max_steps=30, lr=5e-3)
    losses = [r["loss"] for r in result.history]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1


def test_lr_schedule_warmup_then_linear_decay():
    cfg = TrainConfig(max_steps=10, warmup_steps=2, lr_schedule="linear")
    assert [round(lr_factor(s, cfg), 4) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375,
                                                                 0.25, 0.125]
    cos = TrainConfig(max_steps=4, lr_schedule="cosine")
    assert lr_factor(0, cos) == pytest.approx(1.0) and lr_factor(2, cos) == pytest.approx(0.5)


class _Recorder(TrainHook):
    def __init__(self):
        self.events = []

    def on_train_begin(self, ctx):
        self.events.append(("begin", ctx.step))

    def on_step_begin(self, ctx):
        self.events.append(("step_begin", ctx.step))

    def on_step_end(self, ctx):
        self.events.append(("step_end", ctx.step))

    def on_train_end(self, ctx):
        self.events.append(("end", ctx.step))


def test_hooks_run_at_optimizer_step_boundaries():
    rec = _Recorder()
    _run("lora", max_steps=2, grad_accum=3, hooks=[rec])
    assert rec.events == [("begin", 0), ("step_begin", 0), ("step_end", 1), ("step_begin", 1), ("step_end", 2),
                          ("end", 2)]


def test_bf16_autocast_trains():
    model, result = _run("lora", mixed_precision="bf16", max_steps=2)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32 under autocast


def test_fp16_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        _run("lora", mixed_precision="fp16")


def test_gradient_checkpointing_gives_same_update():
    plain, _ = _run("lora", max_steps=2)
    ckpt, _ = _run("lora", max_steps=2, gradient_checkpointing=True)
    assert ckpt.is_activation_checkpointing
    _assert_same(_params(plain), _params(ckpt), atol=1e-6)


def test_bad_train_config_is_a_clear_error():
    with pytest.raises(ValueError, match="grad_accum must be >= 1"):
        TrainConfig(grad_accum=0)


def test_tensorboard_logs_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run("lora", max_steps=3, output_dir=str(tmp_path), tensorboard=True)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "tokens_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]


def test_optimizer_options_make_their_own_groups_and_the_schedule_scales_them():
    from leantune.train.loop import build_adamw, set_lr

    model, _ = tiny()
    method = leantune.apply(model, "lora", r=2)
    names = [n for n, _ in method.trainable_parameters()]
    special = names[3]
    method.optimizer_options = lambda: {special: {"lr_scale": 2.0, "weight_decay": 0.5}, "not.a.parameter": {}}
    opt = build_adamw(method, 1e-3, TrainConfig(weight_decay=0.01))
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups] == [
        (1e-3, 0.01, len(names) - 1), (2e-3, 0.5, 1)]
    assert opt.param_groups[1]["params"][0] is dict(method.trainable_parameters())[special]
    set_lr(opt, 4e-4)  # what the loop does every step with the scheduled LR
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([4e-4, 8e-4])
    again = build_adamw(method, 1e-3, TrainConfig(weight_decay=0.01))
    assert [len(g["params"]) for g in again.param_groups] == [len(names) - 1, 1]  # same order: a saved state loads
    again.load_state_dict(opt.state_dict())
