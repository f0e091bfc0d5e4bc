"""The training loop: AdamW, warmup + decay, gradient accumulation, clipping, mixed precision, gradient
checkpointing, periodic eval, atomic checkpoints with exact resume, a NaN guard, and schedule hooks.

It trains whatever ``model.leantune_method`` says trains and knows no method by name. Accelerate places the
model, wraps it for data parallelism under ``torchrun``/``accelerate launch``, and scales fp16 losses.

The loss of an optimizer step is the sum of token losses over all its micro-batches divided by the number of
target tokens in all of them, so ``batch 8 x accum 1`` and ``batch 4 x accum 2`` give the same update.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.encode import IGNORE, collate
from ..hooks import TrainContext, TrainHook
from . import checkpoint as ckpt
from . import parallel


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainConfig:
    max_steps: int = 100
    lr: float | None = None  # None: the method's documented default
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    lr_schedule: str = "linear"  # linear | cosine | constant (after warmup)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16
    distributed: str = "auto"  # auto (ddp with several processes) | no | ddp | fsdp (see train/parallel.py)
    gradient_checkpointing: bool = False
    eval_every: int = 0  # optimizer steps between evaluations (0: only at the end, if an eval_fn is given)
    save_every: int = 0  # optimizer steps between checkpoints (0: none)
    keep_checkpoints: int = 2
    log_every: int = 1
    output_dir: str | None = None
    resume: bool = True  # continue from the last checkpoint in output_dir when there is one
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self):
        checks = [
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.lr_schedule in ("linear", "cosine", "constant"), "lr_schedule must be linear, cosine or constant"),
            (self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision must be no, bf16 or fp16"),
            (self.distributed in ("auto", "no", "ddp", "fsdp"), "distributed must be auto, no, ddp or fsdp"),
            (self.lr is None or self.lr > 0, "lr must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"train config: {msg} (got {asdict(self)})")


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    history: list[dict] = field(default_factory=list)
    output_dir: str | None = None


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base LR for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


class BatchStream:
    """Micro-batch ``i`` of a seeded, epoch-wise shuffled stream: a pure function of (seed, i), so a resumed run
    sees the same batches without replaying the data."""

    def __init__(self, data: list[dict], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if not data:
            raise ValueError("no training examples")
        self.data, self.bs, self.seed, self.rank, self.world = data, batch_size, seed, rank, world
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.data), generator=g).tolist()}
        return self._perms[epoch]

    def batch(self, i: int) -> list[dict]:
        """This rank's shard of global micro-batch ``i`` (the global one holds ``batch_size x world`` examples)."""
        return self._examples((i * self.world + self.rank) * self.bs, self.bs)

    def global_batch(self, i: int) -> list[dict]:
        """Every rank's shard of micro-batch ``i``, in rank order: what a single process with the global batch
        size reads (calibration data that must be the same on every rank)."""
        return self._examples(i * self.world * self.bs, self.world * self.bs)

    def _examples(self, start: int, count: int) -> list[dict]:
        n = len(self.data)
        return [self.data[self._perm(pos // n)[pos % n]] for pos in range(start, start + count)]


def token_loss_sum(model: nn.Module, batch: dict, causal: bool) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over target tokens, and their count."""
    if "position_ids" in batch:  # packed rows: no 2D mask and no cache, so transformers masks block-causally
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    elif "decoder_input_ids" in batch:  # an encoder-decoder: the logits are the decoder's, aligned with the labels
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"],
                       decoder_attention_mask=batch["decoder_attention_mask"], use_cache=False).logits
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss, int((labels != IGNORE).sum())


def _accelerator(mixed_precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(True)  # one process: let each train() call pick its own precision
        GradientState._reset_state()
    # cpu=True without a GPU: accelerate then sets up gloo for several processes (it ignores torchrun otherwise)
    acc = Accelerator(mixed_precision="fp16" if mixed_precision == "fp16" else "no", cpu=not torch.cuda.is_available())
    if mixed_precision == "fp16" and acc.device.type != "cuda":
        raise ValueError("mixed_precision='fp16' needs a CUDA device; use 'bf16' or 'no' on this machine")
    if mixed_precision == "bf16" and acc.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bf16; use mixed_precision='fp16'")
    return acc


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def param_groups(method, named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """One optimizer group per distinct (lr_scale, weight_decay) the method asks for (``optimizer_options``), the
    run's own settings first; groups come in a fixed order so that a saved optimizer state loads back."""
    options = method.optimizer_options()  # names that do not train right now are simply not used
    groups: dict[tuple[float, float], list] = {}
    for name, p in named:
        o = options.get(name, {})
        key = (float(o.get("lr_scale", 1.0)), float(o.get("weight_decay", weight_decay)))
        groups.setdefault(key, []).append(p)
    default = (1.0, float(weight_decay))
    order = sorted(groups, key=lambda k: (k != default, k))
    return [{"params": groups[k], "lr_scale": k[0], "weight_decay": k[1]} for k in order]


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled learning rate, times each group's ``lr_scale``."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_adamw(method, lr: float, cfg: TrainConfig, old: torch.optim.Optimizer | None = None) -> torch.optim.Optimizer:
    """AdamW over the parameters that train now. Rebuilding (a schedule changed what trains): parameters that stay
    keep their state, and those that left lose their gradients (and, with the old optimizer, their state)."""
    named = [(n, p) for n, p in method.trainable_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"method {method.name!r} has no trainable parameters right now")
    method.masters.enable()  # whoever builds an optimizer trains: low-precision base tensors get float32 masters
    named = method.masters.optimizer_params(named)
    params = [p for _, p in named]
    opt = torch.optim.AdamW(param_groups(method, named, cfg.weight_decay), lr=lr, betas=cfg.betas,
                            weight_decay=cfg.weight_decay)
    set_lr(opt, lr)
    if old is not None:
        keep = {id(p) for p in params}
        for group in old.param_groups:
            for p in group["params"]:
                if id(p) in keep and p in old.state:
                    opt.state[p] = old.state[p]
                elif id(p) not in keep:
                    p.grad = None
    return opt

def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward (what ``gradient_checkpointing=True`` turns on)."""
    kwargs = {"use_reentrant": False}  # non-reentrant: works with a frozen base and no input grads
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} has no gradient checkpointing switch")


def train(
    model: nn.Module,
    train_data: list[dict],
    config: TrainConfig | None = None,
    *,
    pad_id: int = 0,
    eval_fn=None,
    hooks: list[TrainHook] | tuple = (),
) -> TrainResult:
    """Train ``model`` (which carries a method from ``leantune.apply``) on encoded examples
    (``{"input_ids", "labels"}`` lists). ``eval_fn(model) -> dict`` runs every ``eval_every`` steps and at the
    end. Writes ``metrics.jsonl``, checkpoints and the final adapter to ``config.output_dir`` when set."""
    cfg = config or TrainConfig()
    method = getattr(model, "leantune_method", None)
    if method is None:
        raise ValueError("the model carries no leantune method: call leantune.apply(model, ...) first")
    base_lr = cfg.lr if cfg.lr is not None else method.default_lr
    acc = _accelerator(cfg.mixed_precision)
    causal = method.anatomy.causal
    out = Path(cfg.output_dir) if cfg.output_dir else None

    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if hasattr(model, "config"):
        model.config.use_cache = False
    par = parallel.make(cfg.distributed, acc)
    all_hooks = [h for h in [method.schedule(), *hooks] if h is not None]
    ctx = TrainContext(model=model, method=method, config=cfg)

    def build_optimizer():
        return build_adamw(method, base_lr, cfg, ctx.optimizer)

    ctx._rebuild = build_optimizer
    stream = BatchStream(train_data, cfg.batch_size, cfg.seed, par.rank, par.world)
    ctx._batches = lambda n: [{k: v.to(acc.device) for k, v in collate(stream.global_batch(i), pad_id).items()}
                              for i in range(n)]
    start_step, resumed_from = 0, None
    method.masters.enable()  # before a resume loads the checkpoint: its float32 values go to the masters whole
    if out is not None and cfg.resume:  # before wrapping: the tensors (and a pruned shape) go in unsharded
        last = ckpt.latest(out)
        if last is not None:
            start_step, resumed_from = ckpt.load_checkpoint(last, method, all_hooks), last
    wrapped = par.wrap(model, method)
    model.train()
    ctx.step = start_step
    if resumed_from is None:
        seed_everything(cfg.seed)
    for h in all_hooks:
        h.on_train_begin(ctx)
    if ctx.optimizer is None:
        ctx.optimizer = build_optimizer()
    if resumed_from is not None:
        ckpt.load_optimizer_and_rng(resumed_from, ctx.optimizer, acc.scaler, par.shard_optimizer_state)

    metrics = _MetricsWriter(out, start_step, cfg.tensorboard) if par.is_main else None
    progress = _progress(cfg, start_step, method.name) if par.is_main else None
    history: list[dict] = []
    loss_value = float("nan")
    t_start = time.perf_counter()
    autocast = (
        torch.autocast(acc.device.type, dtype=torch.bfloat16) if cfg.mixed_precision == "bf16" else _null()
    )

    try:
        for step in range(start_step, cfg.max_steps):
            ctx.step = step
            ctx.logs = {}
            for h in all_hooks:
                h.on_step_begin(ctx)
            opt = ctx.optimizer
            lr = base_lr * lr_factor(step, cfg)
            set_lr(opt, lr)
            t0 = time.perf_counter()
            micro = [collate(stream.batch(step * cfg.grad_accum + j), pad_id) for j in range(cfg.grad_accum)]
            # the step's loss is the sum of token losses over the whole global batch over its target count; ranks
            # average their gradients, so each rank's share is scaled by the number of ranks
            n_target = par.sum(sum(int((m["labels"][:, 1:] if causal else m["labels"]).ne(IGNORE).sum())
                                   for m in micro))
            n_tokens = int(par.sum(sum(int(m["attention_mask"].sum()) for m in micro)))
            step_loss_sum = 0.0
            for j, mb in enumerate(micro):
                mb = {k: v.to(acc.device) for k, v in mb.items()}
                with par.no_sync(wrapped, last=j == len(micro) - 1), autocast:
                    loss_sum, _ = token_loss_sum(wrapped, mb, causal)
                    loss = loss_sum * par.world / max(1, n_target)
                    extra = [e for h in all_hooks if (e := h.extra_loss(ctx)) is not None]
                    total = loss + sum(extra) / len(micro) if extra else loss
                if not torch.isfinite(total):
                    raise NonFiniteLossError(_nan_message(total, step, j, out))
                acc.backward(total)
                step_loss_sum += float(loss_sum.detach())
            step_loss = par.sum(step_loss_sum) / max(1, n_target)
            par.sync_grads([p for _, p in method.trainable_parameters() if p.requires_grad])
            method.masters.grads_to_masters()
            params = [p for g in opt.param_groups for p in g["params"]]
            if acc.scaler is not None:
                acc.scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm over every rank's shards
                grad_norm = grad_norm.full_tensor()
            if not torch.isfinite(grad_norm) and acc.scaler is None:
                raise NonFiniteLossError(_nan_message(grad_norm, step, None, out, what="gradient norm"))
            if acc.scaler is not None:
                acc.scaler.step(opt)
                acc.scaler.update()
            else:
                opt.step()
            method.masters.write_back()
            opt.zero_grad(set_to_none=True)
            ctx.step = step + 1
            for h in all_hooks:
                h.on_step_end(ctx)
            dt = time.perf_counter() - t0
            loss_value = step_loss
            row = {"step": step + 1, "loss": round(loss_value, 6), "lr": lr, "grad_norm": round(float(grad_norm), 6),
                   "tokens": n_tokens, "tokens_per_s": round(n_tokens / dt, 1),
                   "step_time_s": round(dt, 5), **ctx.logs}
            if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
                row.update(_run_eval(eval_fn, model))
            history.append(row)
            if metrics is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps):
                metrics.write(row)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if out is not None and cfg.save_every and (step + 1) % cfg.save_every == 0:
                ckpt.save_checkpoint(out, step + 1, model, ctx.optimizer, all_hooks, cfg.keep_checkpoints, acc.scaler,
                                     par)
        final_eval = _run_eval(eval_fn, model) if eval_fn is not None else {}
        if final_eval:
            history.append({"step": cfg.max_steps, **final_eval})
            if metrics is not None:
                metrics.write({"step": cfg.max_steps, **final_eval})
        for h in all_hooks:
            h.on_train_end(ctx)
    finally:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
    model.eval()
    if out is not None:
        from .. import io

        state = par.full_state(method)  # every rank takes part in gathering (FSDP); rank 0 writes
        if par.is_main:
            io.save(model, out, {"train": {**asdict(cfg), "lr": base_lr, "steps": cfg.max_steps, "world_size": par.world,
                                           "train_seconds": round(time.perf_counter() - t_start, 3)}}, state=state)
        par.barrier()
    return TrainResult(steps=cfg.max_steps, final_loss=loss_value, history=history,
                       output_dir=str(out) if out else None)


def _nan_message(value, step, micro, out, what="loss") -> str:
    last = ckpt.latest(out) if out is not None else None
    where = f"step {step + 1}" + (f", micro-batch {micro + 1}" if micro is not None else "")
    keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    return (f"{what} is {float(value.detach())} at {where}; training stopped and {keep}. Lower the learning rate, "
            "enable gradient clipping (max_grad_norm), or check the data for empty targets.")


def _run_eval(eval_fn, model) -> dict:
    was = model.training
    model.eval()
    try:
        res = eval_fn(model)
    finally:
        model.train(was)
    return {f"eval_{k}": v for k, v in res.items() if isinstance(v, (int, float))}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class _MetricsWriter:
    """``metrics.jsonl`` (one JSON object per logged step); a resumed run drops lines past its start step."""

    def __init__(self, out: Path | None, start_step: int, tensorboard: bool):
        self.f = None
        self.tb = None
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        if path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        self.f = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("tensorboard=True needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, row: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self):
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def _progress(cfg: TrainConfig, start: int, name: str):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=start, desc=f"train {name}", unit="step",
                disable=os.environ.get("LEANTUNE_NO_PROGRESS") == "1", dynamic_ncols=True)
