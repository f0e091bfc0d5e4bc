"""``leantune plan``: the memory of one training step of each method, before anything is allocated.

Not a formula: the model is built from its config under ``FakeTensorMode`` (tensors with shapes, dtypes and
devices but no data), the method is applied, and the bench's own step (``measure/step.py``: schedule hooks, the
loop's token loss, clipping, AdamW with float32 masters) runs twice — a warm-up step that creates the optimizer
state, then the measured one — while :class:`~leantune.measure.memory.LiveBytesMeter` follows every tensor
storage as it appears and dies. Weights, gradients, optimizer state and saved activations are read with the
bench's meters (``measure/memory.py``), so they mean what the bench's breakdown means; ``step_peak`` is the
high-water mark of the measured step (everything alive included: weights, masters, optimizer state, the batch,
activations, gradients, temporaries), without what the process held before the model was built.

Schedules are planned in the state the bench measures: LISA with its first draw of ``gamma`` active blocks (every
draw has the same size), Light-PEFT after pruning. Light-PEFT's prune depends on the data, so without
``--prune-plan`` it is planned as an upper bound for its configured amounts: the largest figures of prunes that
keep exactly the configured counts and the most expensive parts (:func:`light_peft_bound`).

A quantized base (``--quantize``) is bitsandbytes' own layers on fake tensors (:func:`_fake_quantize_model`).
Data parallelism is derived from the one-process step, per rank (:func:`_distribute`, :func:`fsdp_layout`).
What fake tensors cannot see is the named ``ALLOWANCE`` below, added for a device-memory verdict, never to the
breakdown itself. The planner knows no method by name (it reads capabilities).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    unset_fake_temporarily,
)
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from ..data.encode import decoder_start
from .memory import (
    LiveBytesMeter,
    SavedTensorMeter,
    allocator_peak,
    grad_bytes,
    optimizer_bytes,
    peak_region,
    weight_bytes,
)

# -- the allowance: what fake tensors cannot see ------------------------------------------------------------

# Added to step_peak for the device-memory verdict on CUDA (never on the CPU, where step_peak is what the
# allocator saw). NOT CALIBRATED: no GPU was available when these were set (docs/plan.md says how to calibrate).
#   cuda_context: the CUDA context and the kernels' modules, outside the caching allocator (a few hundred MiB)
#   fragmentation: the caching allocator's reserved-but-unused share, as a fraction of step_peak
#   attention_workspace: cuBLAS / attention kernels' scratch space beyond the tensors they return
ALLOWANCE = {"cuda_context": 600 * 2**20, "fragmentation": 0.10, "attention_workspace": 64 * 2**20, "calibrated": False}
CUDA_BLOCK = 512  # the caching allocator's rounding: every block a multiple of 512 bytes

SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "configs"
EFFICIENCY = "builtin:efficiency"
MEMORY_KEYS = ("weights", "grads", "optimizer", "activations", "step_peak")
MIXED = ("no", "bf16", "fp16")
DISTRIBUTED = ("no", "ddp", "fsdp")


@dataclass
class PlanSettings:
    batch_size: int = 1
    seq_len: int = 512
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    base_dtype: str = "auto"  # auto: the config's dtype (fp16 becomes fp32 when planning for the CPU)
    device: str = "cuda"
    distributed: str = "no"
    world_size: int = 1
    quantize: str | None = None  # nf4 | fp4 | int8: the frozen base's linear layers through bitsandbytes

    def __post_init__(self):
        checks = [
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.seq_len >= 2, f"--seq-len must be >= 2 (a causal loss needs two tokens), got {self.seq_len}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (self.mixed_precision in MIXED, f"--mixed-precision must be one of {MIXED}, got {self.mixed_precision!r}"),
            (self.device in ("cuda", "cpu"), f"--device must be cuda or cpu, got {self.device!r}"),
            (self.distributed in DISTRIBUTED, f"--distributed must be one of {DISTRIBUTED}, got {self.distributed!r}"),
            (self.world_size >= 1, f"--world-size must be >= 1, got {self.world_size}"),
            (self.distributed != "no" or self.world_size == 1,
             f"--world-size {self.world_size} needs --distributed ddp or fsdp"),
            (not (self.mixed_precision == "fp16" and self.device == "cpu"), "fp16 mixed precision needs CUDA; use bf16"),
            (self.quantize is None or self.distributed != "fsdp",
             "--quantize with --distributed fsdp is not planned: FSDP shards flat parameters, which packed 4-bit/"
             "8-bit weights are not; plan ddp or one process"),
        ]
        if isinstance(self.quantize, str) and self.quantize.strip().lower() in ("", "none", "no", "off"):
            self.quantize = None
        if self.quantize is not None:
            from ..quant import QuantizeConfig

            self.quantize = QuantizeConfig.from_any(self.quantize).type  # names the value and the choices
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass
class MethodPlan:
    method: str
    label: str
    options: dict
    memory: dict[str, int]
    notes: list[str] = field(default_factory=list)
    needed: int | None = None  # step_peak + allowance (CUDA) or step_peak (CPU)
    fits: bool | None = None
    max_batch_size: int | None = None
    max_seq_len: int | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and v != []}


# -- models from their config alone -------------------------------------------------------------------------


@dataclass
class ModelSource:
    """How to build a model from its config (called under fake tensors), its vocabulary and context length."""

    name: str
    build: callable  # (dtype or None) -> nn.Module
    vocab: int
    max_positions: int | None
    config_dtype: torch.dtype | None = None


def efficiency_source(eff) -> ModelSource:
    """The bench's efficiency model (an ``EfficiencyModel``), from its config (its ``build()`` moves the model,
    which fake tensors refuse)."""
    return _hf_source(EFFICIENCY if eff == type(eff)() else f"efficiency:{eff.name}", eff.config())


def shipped_config(name: str) -> Path | None:
    """The config.json shipped for a hub id (``meta-llama/Llama-3.1-8B``), or None."""
    if name.count("/") != 1 or ".." in name:
        return None
    path = SHIPPED_CONFIGS / name / "config.json"
    return path if path.is_file() else None


def shipped_ids() -> list[str]:
    return sorted(str(p.parent.relative_to(SHIPPED_CONFIGS)) for p in SHIPPED_CONFIGS.glob("*/*/config.json"))


def resolve_model(name: str) -> ModelSource:
    """``builtin:NAME``, ``builtin:efficiency`` (the bench's efficiency model), a local folder with a config.json,
    a config.json file, a hub id whose config leantune ships, or (online) any hub id. No weights are read."""
    if name == EFFICIENCY:
        from .effmodel import EfficiencyModel

        return efficiency_source(EfficiencyModel())
    if name.startswith("builtin:"):
        from ..models import BUILTIN_MODELS, byte_tokenizer

        key = name[len("builtin:"):]
        if key not in BUILTIN_MODELS or key == "base":
            known = ", ".join(f"builtin:{k}" for k in sorted(BUILTIN_MODELS) if k != "base")
            raise ValueError(f"cannot plan {name!r} from a config: use one of {known}, {EFFICIENCY}, a config.json, a "
                             "local folder or a hub id")
        vocab = len(byte_tokenizer())

        def build_builtin(dtype):
            with torch.random.fork_rng(devices=[]), _default_dtype(dtype):
                torch.manual_seed(0)
                return BUILTIN_MODELS[key].build(vocab)

        return ModelSource(name, build_builtin, vocab, 512)
    from transformers import AutoConfig

    path = Path(name)
    if path.is_file():
        if path.name != "config.json" and path.suffix != ".json":
            raise ValueError(f"model {name!r} is a file but not a config.json")
        config = _config_from_file(path)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {name!r} has no config.json")
        config = _config_from_file(path / "config.json")
    elif (shipped := shipped_config(name)) is not None:
        config = _config_from_file(shipped)
    else:
        try:
            config = AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"cannot read the config of {name!r}: not a local folder or config.json, not one of the configs "
                f"leantune ships ({', '.join(shipped_ids())}), and not reachable on the hub ({e.__class__.__name__}). "
                "Download its config.json and pass its path."
            ) from None
    return _hf_source(name, config)


def _config_from_file(path: Path):
    from transformers import AutoConfig

    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if "model_type" not in data:
        raise ValueError(f"{path}: no model_type, so transformers cannot tell which architecture it describes")
    data = dict(data)
    model_type = data.pop("model_type")
    if "torch_dtype" in data and "dtype" not in data:  # published configs use the older name
        data["dtype"] = data.pop("torch_dtype")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _hf_source(name: str, config) -> ModelSource:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from ..anatomy import known_family

    spec = known_family(config.model_type)
    auto = AutoModelForCausalLM if (spec is None or spec.causal) else AutoModelForMaskedLM
    config_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(config_dtype, str):
        config_dtype = getattr(torch, config_dtype, None)
    config.use_cache = False

    def build_hf(dtype):
        cfg = copy.deepcopy(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = auto.from_config(cfg, dtype=dtype or torch.float32, attn_implementation="sdpa")
        model.config.name_or_path = name
        return model

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelSource(name, build_hf, int(text.vocab_size), getattr(text, "max_position_embeddings", None),
                       config_dtype)


@contextlib.contextmanager
def _default_dtype(dtype):
    """Build in ``dtype`` directly (casting a built model swaps its tensors, which fake tensors refuse)."""
    old = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def plan_dtype(source: ModelSource, settings: PlanSettings) -> torch.dtype | None:
    """The base's dtype as ``load_model`` would load it (``--base-dtype``), on the planned device."""
    from ..precision import base_dtype

    dtype = base_dtype(settings.base_dtype)
    if dtype is None:
        dtype = source.config_dtype
        if dtype == torch.float16 and settings.device == "cpu":
            dtype = torch.float32  # load_model upcasts an fp16 checkpoint without a GPU
    return dtype


@contextlib.contextmanager
def _masks_as_real():
    """transformers drops an all-ones attention mask (SDPA's ``is_causal`` instead of an L x L mask) after reading
    its values, but takes a fake tensor for a graph being traced and keeps the mask. The planned step is the eager
    one: fake tensors are not tracing here (their values read as 1, so an all-ones mask is dropped, as in the
    bench's unpadded batch)."""
    from transformers import masking_utils

    real = masking_utils.is_tracing

    def is_tracing(tensor=None):
        from torch._subclasses.fake_tensor import FakeTensor

        return real(None if isinstance(tensor, FakeTensor) else tensor)

    masking_utils.is_tracing = is_tracing
    try:
        yield
    finally:
        masking_utils.is_tracing = real


class _GroupedProduct(torch.autograd.Function):
    """What ``torch._grouped_mm(input (S, in), weight (E, in, out), offs)`` allocates and saves, on fake tensors of
    any dtype: the output; for backward the input only when the weight takes a gradient and the weight only when
    the input does (autograd's rule for the op); in backward one gradient per operand that needs one."""

    @staticmethod
    def forward(ctx, input, weight, offs):
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(input if need_weight else None, weight if need_input else None)
        ctx.shapes = (input.shape, input.dtype, weight.shape, weight.dtype)
        return input.new_empty((input.shape[0], weight.shape[-1]))

    @staticmethod
    def backward(ctx, grad):
        in_shape, in_dtype, w_shape, w_dtype = ctx.shapes
        return (grad.new_empty(in_shape, dtype=in_dtype) if ctx.needs_input_grad[0] else None,
                grad.new_empty(w_shape, dtype=w_dtype) if ctx.needs_input_grad[1] else None, None)


@contextlib.contextmanager
def _experts_traceable():
    """transformers' mixture-of-experts layers multiply by torch's ``grouped_mm``, whose fake kernel takes
    bfloat16 only (the rule of its CUDA kernel), while a float32 base runs it (the CPU kernel; transformers falls
    back elsewhere). Under the trace a product on fake tensors that are not bfloat16 is :class:`_GroupedProduct`:
    the same output, saved tensors and gradients as the op (checked against measured CPU steps on Mixtral and
    Qwen2-MoE)."""
    try:
        from transformers.integrations import moe
    except ImportError:
        yield
        return
    real = moe._grouped_mm

    def grouped_mm(input, weight, offs):
        from torch._subclasses.fake_tensor import FakeTensor

        if isinstance(weight, FakeTensor) and weight.dtype != torch.bfloat16:
            return _GroupedProduct.apply(input.to(weight.dtype), weight, offs)
        return real(input, weight, offs)

    moe._grouped_mm = grouped_mm
    try:
        yield
    finally:
        moe._grouped_mm = real


class _SmallValues(TorchDispatchMode):
    """Real values beside the fake tensors that decide what a method builds: index lists, seeded random draws,
    masks of units (S²FT's selection, Light-PEFT's surgery). A tensor gets a real twin when every tensor it is made
    from has one (or is real) and it is small, or when a factory makes it small and non-floating (``ones``,
    ``arange``) or from a seeded generator (``rand(generator=...)``). Ops whose output shape or value depends on
    data (``nonzero``, ``.tolist()``) then read the twin; the model's weights and activations stay fake."""

    LIMIT = 1 << 22  # elements

    def __init__(self, fake_mode):
        super().__init__()
        self.fake_mode = fake_mode
        self.twins = WeakIdKeyDictionary()
        self.enabled = True  # off for the training steps, where nothing reads a value that decides a shape

    def _has(self, x) -> bool:
        return not isinstance(x, FakeTensor) or x in self.twins

    def _real(self, x):
        return self.twins[x] if isinstance(x, FakeTensor) else x

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.enabled:
            return func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        if tensors and not all(self._has(x) for x in tensors):
            if func._schema.is_mutable:  # a twin written by an op we do not mirror would go stale: drop it
                for a, x in zip(func._schema.arguments, args, strict=False):
                    if a.alias_info is not None and a.alias_info.is_write and isinstance(x, FakeTensor):
                        self.twins.pop(x, None)
            return func(*args, **kwargs)
        seeded = kwargs.get("generator") is not None
        try:
            out = func(*args, **kwargs)
            missing = False
        except (DataDependentOutputException, DynamicOutputShapeException):
            out, missing = None, True
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if not missing:
            if not outs or any(o.numel() > self.LIMIT for o in outs):
                return out
            if not tensors and not seeded and any(o.is_floating_point() for o in outs):
                return out  # a weight being made (empty, zeros): no twin
        real_args, real_kwargs = tree_unflatten([self._real(x) for x in flat], spec)
        with _disable_current_modes(), unset_fake_temporarily():
            real = func(*real_args, **real_kwargs)
        if missing:
            if not isinstance(real, torch.Tensor):
                return real  # a Python scalar read (.item(), .tolist())
            with _disable_current_modes():
                out = self.fake_mode.from_tensor(real)
            outs = [out]
        for o, r in zip(outs, [r for r in tree_flatten(real)[0] if isinstance(r, torch.Tensor)], strict=False):
            if isinstance(o, FakeTensor):
                self.twins[o] = r
        return out


def _convert(t: torch.Tensor, device, dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)


@contextlib.contextmanager
def _moves_in_place():
    """``module.to(...)`` on fake parameters (PEFT moving and casting the layers it adds): PyTorch swaps each
    tensor for its converted copy, which fails once anything holds a weak reference to it. A call that changes
    nothing returns the module; one that fails to swap sets new parameter objects, as PyTorch did before swapping
    existed (the layers are new: nothing holds their parameters yet)."""
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _, fmt = torch._C._nn._parse_to(*args, **kwargs)
        tensors = [*self.parameters(), *self.buffers()]
        same = fmt is None and all((device is None or t.device == torch.device(device))
                                   and (dtype is None or not t.is_floating_point() or t.dtype == dtype)
                                   for t in tensors)
        if same:
            return self
        try:
            return real_to(self, *args, **kwargs)
        except RuntimeError as e:
            if "swap" not in str(e):
                raise
        for m in self.modules():  # the conversion PyTorch made before swapping: new parameter objects
            for k, p in m._parameters.items():
                if p is not None:
                    m._parameters[k] = torch.nn.Parameter(_convert(p, device, dtype), requires_grad=p.requires_grad)
            for k, b in m._buffers.items():
                if b is not None:
                    m._buffers[k] = _convert(b, device, dtype)
        return self

    torch.nn.Module.to = to
    try:
        yield
    finally:
        torch.nn.Module.to = real_to


# -- a quantized base ----------------------------------------------------------------------------------------


def build_model(source: ModelSource, settings: PlanSettings, fake: bool):
    """The model as ``load_model`` would give it: in the planned dtype, its linear layers quantized with
    ``--quantize`` (for real: ``quant.quantize_model``; traced: :func:`_fake_quantize_model`)."""
    model = source.build(plan_dtype(source, settings))
    if settings.quantize is not None:
        from ..quant import quantize_model

        (_fake_quantize_model if fake else quantize_model)(model, settings.quantize)
    return model


def _fake_quantize_model(model, quantize) -> None:
    """``quant.quantize_model`` under fake tensors. bitsandbytes' parameter classes (``Params4bit``,
    ``Int8Params``) cannot wrap a fake tensor, so each layer is bitsandbytes' own ``Linear4bit`` /
    ``Linear8bitLt``, made on the meta device outside the fake mode, given as plain parameters what bitsandbytes'
    quantize functions return for the (fake) weight through their registered fake kernels: the packed codes and
    the quantization state with the shapes and dtypes a real quantize gives (4-bit: ``(n*k+1)//2`` bytes, an
    absmax per 64-value block, with double quantization those as bytes plus a float per 256 of them and the code
    tables; int8: the codes and a float32 scale per row). Forward and backward are then bitsandbytes' own
    (``MatMul4Bit``: dequantize for the input's gradient; ``MatMul8bitFp``: dequantize in both), on fake tensors."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from ..quant import ATTR, QuantizeConfig

    cfg = QuantizeConfig.from_any(quantize)
    cached = dict(bnbf.name2qmap)  # bitsandbytes caches its code table: a fake one must not outlive the trace
    bnbf.name2qmap.clear()
    try:
        _fake_quantize_layers(model, cfg, bnb, bnbf)
    finally:
        bnbf.name2qmap.clear()
        bnbf.name2qmap.update(cached)
    model.__dict__[ATTR] = cfg


def _fake_quantize_layers(model, cfg, bnb, bnbf) -> None:
    from torch import nn

    from ..anatomy import is_conv1d
    from ..quant import _CONV1D, _compute_dtype, _targets

    tied = getattr(getattr(model, "get_input_embeddings", lambda: None)(), "weight", None)
    for name, mod in _targets(model, cfg):
        if tied is not None and mod.weight is tied:
            continue
        w = (mod.weight.t() if is_conv1d(mod) else mod.weight).detach().contiguous()
        out_f, in_f = w.shape
        has_bias = mod.bias is not None
        with _disable_current_modes(), unset_fake_temporarily():  # meta tensors, no data: the classes' own init
            if cfg.type == "int8":
                q = bnb.nn.Linear8bitLt(in_f, out_f, bias=has_bias, has_fp16_weights=False, threshold=cfg.threshold,
                                        device="meta")
            else:
                q = bnb.nn.Linear4bit(in_f, out_f, bias=has_bias, compute_dtype=_compute_dtype(cfg, w.dtype),
                                      compress_statistics=cfg.double_quant, quant_type=cfg.type, device="meta")
        if cfg.type == "int8":  # as Int8Params quantizes, and as the layer's first forward moves the codes
            codes, scales, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
            q.weight = nn.Parameter(codes, requires_grad=False)
            q.weight.CB = q.weight.SCB = None
            q.state.CB, q.state.SCB = codes, scales
        else:  # as Params4bit quantizes (its default 64-value blocks)
            packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=cfg.double_quant,
                                               quant_type=cfg.type, quant_storage=torch.uint8)
            q.weight = nn.Parameter(packed, requires_grad=False)
            q.weight.quant_state = q.quant_state = state
            q.weight.quant_type, q.weight.compress_statistics, q.weight.blocksize = cfg.type, cfg.double_quant, 64
            q.support_avx512bf16_for_cpu = False
        if has_bias:
            q.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        q.train(mod.training)
        if is_conv1d(mod):
            q.__dict__[_CONV1D] = type(mod)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)


# -- one planned (or measured) step -------------------------------------------------------------------------


def _batch(vocab: int, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _cuda_stepper():
    from .step import Stepper

    class CudaStepper(Stepper):
        """The bench's stepper with AdamW as it runs on CUDA: the ``foreach`` implementation (PyTorch's default
        there), which holds a full-size temporary of the square roots during the step; the traced tensors live on
        the CPU, where the per-tensor loop would be chosen."""

        def _build_optimizer(self):
            opt = super()._build_optimizer()
            for group in opt.param_groups:
                group["foreach"] = True
            return opt

    return CudaStepper


class _Session:
    """A model with its method and a warmed-up stepper, ready to take measured steps at any batch and length."""

    def __init__(self, source: ModelSource, method: str, options: dict, settings: PlanSettings, fake: bool,
                 max_steps: int = 100):
        from ..api import apply
        from ..train.loop import enable_gradient_checkpointing
        from .step import Stepper

        self.settings, self.fake, self.source = settings, fake, source
        self.meter = LiveBytesMeter(block=CUDA_BLOCK if (fake and settings.device == "cuda") else 1)
        self._stack = contextlib.ExitStack()
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            fake_mode = self._stack.enter_context(FakeTensorMode())
            self._values = self._stack.enter_context(_SmallValues(fake_mode))
            self._stack.enter_context(self.meter)
            self._stack.enter_context(_masks_as_real())
            self._stack.enter_context(_moves_in_place())
            self._stack.enter_context(_experts_traceable())
        try:
            self.model = build_model(source, settings, fake)
            torch.manual_seed(0)
            self.method = apply(self.model, method, **options)
            if settings.gradient_checkpointing:
                enable_gradient_checkpointing(self.model)
            batch = self.batch(settings.batch_size, settings.seq_len)
            stepper_cls = _cuda_stepper() if (fake and settings.device == "cuda") else Stepper
            self.stepper = stepper_cls(self.model, max_steps=max_steps, batch=batch)
            if fake:
                self._values.enabled = False
            self.settle_steps = 0
            if self.method.capabilities.schedule_ends:  # the bench settles the schedule with small steps first
                small = {k: v[:1, :64] for k, v in batch.items()}
                while self.method.capabilities.schedule_ends:
                    if self.settle_steps >= max_steps:
                        raise RuntimeError(f"{method}: its schedule did not finish within {max_steps} steps")
                    self._step(small)
                    self.settle_steps += 1
            self._step(batch)  # warm-up: the optimizer state exists from here on
        except BaseException:
            self.close()
            raise

    def batch(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        b = _batch(self.source.vocab, batch_size, seq_len)
        start = decoder_start(self.model)
        if start is not None:  # an encoder-decoder (T5): seq_len tokens on each side, the labels shifted right
            dec = torch.cat([torch.full_like(b["labels"][:, :1], start), b["labels"][:, :-1]], dim=1)
            b.update(decoder_input_ids=dec, decoder_attention_mask=torch.ones_like(dec))
        return b

    def _autocast(self):
        mp = self.settings.mixed_precision
        if mp == "no":
            return contextlib.nullcontext()
        # fake tensors live on the CPU here; the CPU's autocast casts the same matmuls to the low precision
        return torch.autocast("cpu", dtype=torch.bfloat16 if mp == "bf16" else torch.float16)

    def _step(self, batch: dict, meters: dict | None = None) -> None:
        """One optimizer step the loop's way: ``grad_accum`` micro-batches (two stand for any more: from the second
        on, memory repeats), forward under autocast, backward outside it, then clip, AdamW, masters."""
        st = self.stepper
        st.begin()
        for j in range(min(2, self.settings.grad_accum)):
            if meters is not None and j == 0:
                with SavedTensorMeter(self.model) as saved, self._autocast():
                    loss = st.forward(batch)
                meters["activations"] = saved.saved_bytes()
            else:
                with self._autocast():
                    loss = st.forward(batch)
            loss.backward()
            del loss
        if meters is not None:
            meters["grads"] = grad_bytes(self.model)
        st.finish()

    def measure(self, batch_size: int | None = None, seq_len: int | None = None) -> dict[str, int]:
        """One measured step: the bench's breakdown and the step's high-water mark (what is alive included)."""
        s = self.settings
        batch = self.batch(batch_size or s.batch_size, seq_len or s.seq_len)
        meters: dict[str, int] = {}
        if self.fake:
            self.meter.reset_peak()
            self._step(batch, meters)
            meters["step_peak"] = self.meter.peak
        else:
            with peak_region():  # allocator_peak around the whole session reads its peak here
                self._step(batch, meters)
        return {"weights": weight_bytes(self.model), "grads": meters["grads"],
                "optimizer": optimizer_bytes(self.stepper.optimizer), "activations": meters["activations"],
                "step_peak": meters.get("step_peak", 0)}

    def close(self) -> None:
        self._stack.close()


def measure_real(source: ModelSource, method: str, options: dict, settings: PlanSettings) -> tuple[_Session, dict]:
    """The same step taken for real on this machine's CPU: the bench's meters for the breakdown, the CPU
    allocator's own events (the profiler's) for ``step_peak``, from before the model is built, so the process's
    baseline is left out as the bench's ``peak_before_model`` is."""
    box: dict = {}

    def run():
        box["session"] = _Session(source, method, options, settings, fake=False)
        box["memory"] = box["session"].measure()

    _, peak = allocator_peak(run)
    memory = {**box["memory"], "step_peak": peak}
    return box["session"], memory


# -- Light-PEFT: the most expensive prune its amounts allow ---------------------------------------------------


def light_peft_bound(source: ModelSource, options: dict, settings: PlanSettings, method: str = "light_peft") -> list[dict]:
    """Prune plans that keep, within Light-PEFT's configured amounts (head_ratio, ffn_ratio, module_keep,
    rank_keep), the most expensive parts; the bound is the largest of their figures (:class:`_BoundSession`).
    Counts follow the prune's own rules (``prune/plan.py``), so every kept count equals the real prune's; only
    which parts are kept is chosen (every plan here is one a run can reach):

    - heads: per layer the head shape with the most KV groups (the query-head count is fixed by the amount);
    - FFN channels: packed into whole layers from the first (the global count is fixed; whole layers make the
      widest adapted projections and the widest inputs an adapter must save);
    - adapter modules, two ways, one plan each: the modules with the most parameters (gradients, optimizer
      state, weights), and the first adapted module in forward order (a step saves activations from the first
      module that trains onwards) followed by the modules whose inputs are the widest distinct tensors (LoRA saves
      its input for its gradient; modules fed the same tensor, q/k/v, save it once), found by one fake forward;
    - ranks: on the modules whose rank costs most parameters (the total kept is fixed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..api import apply
    from ..prune.plan import PrunePlan, group_shapes, kept_count

    with FakeTensorMode() as fake_mode, _SmallValues(fake_mode), LiveBytesMeter(), _masks_as_real(), \
            _experts_traceable():
        model = build_model(source, settings, fake=True)
        m = apply(model, method, **options)
        cfg, anat = m.config, m.anatomy
        L, H, KV, inter = len(anat.blocks), anat.n_heads, anat.n_kv_heads, anat.intermediate
        plan = PrunePlan(L, H, KV, anat.head_dim, inter)
        if cfg.head_ratio > 0:
            k, c = max(group_shapes(H, KV, 1.0 - cfg.head_ratio, anat.hidden if cfg.uniform else None))
            g = H // KV
            plan.heads = [[j * g + i for j in range(k) for i in range(c)] for _ in range(L)]
            plan.kv_heads = [list(range(k)) for _ in range(L)]
            if any("cross_o" in blk.linears for blk in anat.blocks):  # cross-attention: as many KV heads as heads
                k, c = max(group_shapes(H, H, 1.0 - cfg.head_ratio, anat.hidden if cfg.uniform else None))
                plan.cross_heads = [list(range(k * c)) if "cross_o" in blk.linears else None for blk in anat.blocks]
        if cfg.ffn_ratio > 0:
            if cfg.uniform:
                plan.ffn = [list(range(kept_count(1.0 - cfg.ffn_ratio, inter))) for _ in range(L)]
            else:
                left = kept_count(1.0 - cfg.ffn_ratio, L * inter, minimum=L)
                widths = []
                for i in range(L):
                    w = min(inter, left - (L - 1 - i))  # every later layer keeps at least one channel
                    widths.append(w)
                    left -= w
                plan.ffn = [list(range(w)) for w in widths]
        m.apply_plan(PrunePlan.from_dict({**plan.to_dict(), "modules": None, "ranks": None}))
        widths = m.peft.prune_widths()
        cost = {n: sum(p.numel() for p in m.peft.child(n).parameters()) for n in widths}
        inputs = _adapter_inputs(model, {n: m.peft.layers[n] for n in widths}, source)
    names = list(widths)
    n_keep = kept_count(cfg.module_keep, len(names))
    by_params = sorted(names, key=lambda n: (-cost[n], names.index(n)))
    groups: dict[int, list[str]] = {}  # modules fed the same tensor, the most parameters first
    for n in by_params:
        groups.setdefault(inputs[n][0], []).append(n)
    earliest = min(names, key=lambda n: inputs[n][2])  # gradients flow back to it: all after it saves activations
    firsts = sorted((ms[0] for ms in groups.values()), key=lambda n: (-inputs[n][1], -cost[n], names.index(n)))
    by_inputs = [earliest] + [n for n in firsts if n != earliest] + [n for n in by_params if n not in firsts]
    plans = []
    for order in (by_params, by_inputs):
        keep = sorted(order[:n_keep], key=names.index)
        if any(p["modules"] == keep for p in plans):
            continue
        per_rank = {n: cost[n] / widths[n] for n in keep}
        total = kept_count(cfg.rank_keep, sum(widths[n] for n in keep), minimum=len(keep))
        ranks = {n: 1 for n in keep}
        left = total - len(keep)
        for n in sorted(keep, key=lambda n: (-per_rank[n], keep.index(n))):
            extra = min(left, widths[n] - 1)
            ranks[n] += extra
            left -= extra
        plan.modules = keep
        plan.ranks = {n: list(range(r)) for n, r in ranks.items()}
        plans.append(plan.to_dict())
    return plans


def _adapter_inputs(model, layers: dict[str, torch.nn.Module], source: ModelSource) -> dict[str, tuple[int, int, int]]:
    """Per adapted layer, (which tensor it is fed, its width in bytes per token, its place in the forward), from
    one fake forward of two tokens: layers fed the same tensor (q, k and v) share the first number."""
    seen: dict[str, tuple[int, int, int]] = {}
    held = []  # the inputs stay alive through the forward, so no id is reused

    def hook(name):
        def pre(_mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            held.append(x)
            seen.setdefault(name, (id(x), x.shape[-1] * x.element_size(), len(seen)))
        return pre

    handles = [mod.register_forward_pre_hook(hook(n), with_kwargs=True) for n, mod in layers.items()]
    try:
        batch = _batch(source.vocab, 1, 2)
        start = decoder_start(model)
        if start is not None:
            batch.update(decoder_input_ids=torch.full_like(batch["input_ids"], start))
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
    return {n: seen.get(n, (id(n), 0, len(seen))) for n in layers}


def sample_prune_plan(source: ModelSource, options: dict, settings: PlanSettings, seed: int,
                      skew: float = 0.0, method: str = "light_peft") -> dict:
    """A prune plan Light-PEFT could make for these amounts: its own selection rules (``prune/plan.py``'s
    ``select_heads``, ``select_channels``, ``select_modules``, ``select_ranks``) fed seeded random scores instead
    of the ones the data would give. ``skew`` > 0 multiplies each layer's and each module's scores by a random
    factor ``exp(skew * N(0, 1))``, so uneven prunes (whole layers kept, ranks piled on a few modules) come up
    too. What the bound is checked against: every plan this makes is one a run can reach."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..api import apply
    from ..prune.plan import PrunePlan, select_channels, select_heads, select_modules, select_ranks

    with FakeTensorMode() as fake_mode, _SmallValues(fake_mode), LiveBytesMeter(), _experts_traceable():
        model = build_model(source, settings, fake=True)
        m = apply(model, method, **options)
        cfg, anat = m.config, m.anatomy
        widths = m.peft.prune_widths()
    g = torch.Generator().manual_seed(seed)

    def scores(n: int, layers: int) -> list[torch.Tensor]:
        factor = torch.exp(skew * torch.randn(layers, 1, generator=g, dtype=torch.float64))
        return list(torch.rand(layers, n, generator=g, dtype=torch.float64) * factor)

    L = len(anat.blocks)
    plan = PrunePlan(L, anat.n_heads, anat.n_kv_heads, anat.head_dim, anat.intermediate)
    if cfg.head_ratio > 0:
        plan.heads, plan.kv_heads = select_heads(scores(anat.n_heads, L), anat.n_kv_heads, cfg.head_ratio,
                                                 cfg.uniform, divisor_of=anat.hidden)
        cross = ["cross_o" in blk.linears for blk in anat.blocks]
        if any(cross):  # as Light-PEFT's make_plan: the cross-attention layers' heads, ranked the same way
            kept = iter(select_heads(scores(anat.n_heads, sum(cross)), anat.n_heads, cfg.head_ratio, cfg.uniform,
                                     divisor_of=anat.hidden)[0])
            plan.cross_heads = [next(kept) if has else None for has in cross]
    if cfg.ffn_ratio > 0:
        plan.ffn = select_channels(scores(anat.intermediate, L), cfg.ffn_ratio, cfg.uniform)
    names = list(widths)
    module = scores(1, len(names))
    plan.modules = select_modules({n: float(module[i][0]) for i, n in enumerate(names)}, cfg.module_keep)
    plan.ranks = select_ranks({n: scores(widths[n], 1)[0] for n in plan.modules}, cfg.rank_keep)
    return plan.to_dict()


def prune_plan_from(adapter_dir: str | os.PathLike) -> dict:
    """The prune plan of a finished Light-PEFT run (its adapter folder)."""
    from ..io import read_meta

    meta = read_meta(adapter_dir)
    plan = (meta.get("config") or {}).get("plan")
    if not plan:
        raise ValueError(f"--prune-plan {str(adapter_dir)!r}: its {meta.get('method')!r} adapter holds no prune plan; "
                         "give the folder a Light-PEFT run wrote after it pruned")
    return plan


# -- the planner --------------------------------------------------------------------------------------------


def method_options(method: str, options: dict | None, bench_settings: bool) -> dict:
    """The options planned: the user's, over the bench's own settings for the method (``--compare``)."""
    from .bench import BENCH_SETTINGS

    base = dict(BENCH_SETTINGS.get(method, {}).get("options", {})) if bench_settings else {}
    return {**base, **(options or {})}


def _label(method_cls, options: dict) -> str:
    return f"{method_cls.name}" + (f" ({', '.join(f'{k}={v}' for k, v in options.items() if k != 'plan')})"
                                   if options else "")


def prepare(source: ModelSource, method: str, options: dict, settings: PlanSettings,
            prune_plan: dict | None = None, bound: bool = True) -> tuple[list[dict], list[str]]:
    """The options the method is planned with (several for Light-PEFT's bound: one per candidate prune, the bound
    is the largest of their figures), and notes on the state planned (schedules, bounds)."""
    from ..methods import get_method

    cls = get_method(method)
    cfg = cls.config_cls.from_dict(options, method=method)  # a bad option fails here, before any model is built
    notes: list[str] = []
    caps = cls(cfg).capabilities
    if settings.quantize is not None and not caps.quantized_base:
        raise ValueError(f"{method} does not train on a quantized base: {caps.quantized_refusal}")
    if settings.quantize == "int8" and settings.device == "cuda":
        notes.append("int8 traced with bitsandbytes' CPU training path (the weight dequantized for each matmul); "
                     "on CUDA it runs LLM.int8's own matmul, whose temporaries differ")
    if settings.distributed == "fsdp" and not caps.fsdp:
        raise ValueError(f"{method} does not train under FSDP: {caps.fsdp_refusal}")
    if caps.schedule_ends:
        if prune_plan is not None:
            options = {**options, "plan": prune_plan}
            notes.append("exact: the prune plan of a finished run (--prune-plan)")
        elif not bound:
            notes.append("measured after its schedule ran (small steps until it pruned), as the bench does")
        else:
            plans = light_peft_bound(source, options, settings, method)
            notes.append(f"after pruning; an upper bound for the configured amounts (the largest figures of {len(plans)} "
                         "prunes keeping the most expensive heads, channels, modules and ranks); --prune-plan "
                         "ADAPTER_DIR plans a finished run exactly")
            return [{**options, "plan": plan} for plan in plans], notes
    return [options], notes


class _BoundSession:
    """Light-PEFT's bound over candidate prunes: each measured in turn (a fake session is a mode on the stack:
    one at a time), each figure the largest of theirs. The peak is composed so that it also covers a prune that
    has one candidate's peak moment with another's larger parts: max over candidates of (its peak + what every
    other figure's maximum adds to its own)."""

    def __init__(self, source: ModelSource, method: str, planned: list[dict], settings: PlanSettings):
        self.source, self.method_name, self.planned, self.settings = source, method, planned, settings
        self.method = None
        self.first = self.measure()

    def measure(self, batch_size: int | None = None, seq_len: int | None = None) -> dict[str, int]:
        mems = []
        for options in self.planned:
            session = _Session(self.source, self.method_name, options, self.settings, fake=True)
            try:
                mems.append(session.measure(batch_size, seq_len))
                self.method = session.method
            finally:
                session.close()
        out = {k: max(m[k] for m in mems) for k in MEMORY_KEYS}
        parts = ("weights", "grads", "optimizer", "activations")
        out["step_peak"] = max(m["step_peak"] + sum(out[k] - m[k] for k in parts) for m in mems)
        return out

    def close(self) -> None:
        pass


def _open(source: ModelSource, method: str, planned: list[dict], settings: PlanSettings):
    """A fake session for the planned options (several: Light-PEFT's bound) and its first measured step."""
    if len(planned) > 1:
        session = _BoundSession(source, method, planned, settings)
        return session, session.first
    session = _Session(source, method, planned[0], settings, fake=True)
    try:
        return session, session.measure()
    except BaseException:
        session.close()
        raise


def _shard_bytes(t: torch.Tensor, n: int) -> int:
    """Bytes of rank 0's shard of ``t`` under FSDP2 over ``n`` ranks: dim 0 cut into ``ceil(d0 / n)`` rows (rank 0
    holds a full chunk, the largest; later ranks hold the rest); a 0-dim tensor stays whole."""
    if t.dim() == 0:
        return t.element_size()
    d0 = t.shape[0]
    return -(-d0 // n) * (t.numel() // max(d0, 1)) * t.element_size()


def fsdp_layout(model, optimizer, blocks, n: int) -> dict[str, int]:
    """What FSDP2 (``train/parallel.py``: ``fully_shard`` on every block, then the root) gives rank 0 of ``n``,
    from the traced model and optimizer: its shards of the weights, gradients and optimizer state (each tensor
    shaped like its parameter is sharded; AdamW's scalar ``step`` stays whole), the root unit's parameters (the
    ones in no block: embeddings, head, final norm), the largest block's parameters and its trainable part."""
    params = {id(p): p for p in model.parameters()}
    in_blocks = {id(p) for b in blocks for p in b.module.parameters()}
    state = [(p, v) for p, st in optimizer.state.items() for v in st.values() if torch.is_tensor(v)]
    return {
        "weights": sum(_shard_bytes(p, n) for p in params.values()),
        "grads": sum(_shard_bytes(p, n) for p in params.values() if p.requires_grad),
        "optimizer": sum(_shard_bytes(v, n) if v.shape == p.shape else v.numel() * v.element_size() for p, v in state),
        "root": sum(p.numel() * p.element_size() for i, p in params.items() if i not in in_blocks),
        "block": max(sum(p.numel() * p.element_size() for p in b.module.parameters()) for b in blocks),
        "block_grads": max(sum(p.numel() * p.element_size() for p in b.module.parameters() if p.requires_grad)
                           for b in blocks),
    }


def _distribute(memory: dict, settings: PlanSettings, notes: list[str], layout: dict | None) -> dict:
    """Per-rank memory under data parallelism, derived from the one-process step (arithmetic, not traced)."""
    n = settings.world_size
    if settings.distributed == "ddp":
        out = dict(memory)
        out["step_peak"] += memory["grads"]
        notes.append("ddp: + one copy of the gradients (DDP's buckets, or the flat all-reduce of a changing "
                     "trainable set); derived from the traced step, not traced")
        return out
    if settings.distributed == "fsdp":
        out = dict(memory)
        saved = 0
        for key in ("weights", "grads", "optimizer"):
            out[key] = layout[key]
            saved += memory[key] - out[key]
        root_shard = -(-layout["root"] // n)
        out["step_peak"] = (memory["step_peak"] - saved + (layout["root"] - root_shard) + 2 * layout["block"]
                            + layout["block_grads"])
        notes.append(f"fsdp, rank 0 of {n}: its shards of weights, gradients and optimizer state (dim 0 in {n} "
                     "chunks, rank 0's the largest); step_peak + the root unit unsharded (kept through the step), two "
                     "unsharded blocks (the one computing and the one prefetched) and one block's unsharded "
                     "gradients (before the reduce-scatter); derived from the traced step, not traced")
        return out
    return memory


def allowance_bytes(step_peak: int, settings: PlanSettings) -> int:
    if settings.device != "cuda":
        return 0
    return int(ALLOWANCE["cuda_context"] + ALLOWANCE["attention_workspace"] + ALLOWANCE["fragmentation"] * step_peak)


def plan_method(model: str | ModelSource, method: str, options: dict | None = None,
                settings: PlanSettings | None = None, *, prune_plan: dict | None = None,
                device_memory: int | None = None, fake: bool = True, bench_settings: bool = False) -> MethodPlan:
    """Plan one method (``fake=False``: take the same step for real on the CPU and measure it instead)."""
    settings = settings or PlanSettings()
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    opts = method_options(method, options, bench_settings)
    planned, notes = prepare(source, method, opts, settings, prune_plan, bound=fake)
    if not fake and (settings.device != "cpu" or device_memory is not None or settings.distributed != "no"):
        raise ValueError("a measured step runs once, in one process, on this machine's CPU: device='cpu', no "
                         "device_memory, no distribution")
    if fake:
        session, memory = _open(source, method, planned, settings)
    else:
        session, memory = measure_real(source, method, planned[0], settings)
    try:
        caps = session.method.capabilities
        anat = session.method.anatomy
        layout = (fsdp_layout(session.model, session.stepper.optimizer, anat.blocks, settings.world_size)
                  if settings.distributed == "fsdp" else None)
        if caps.changes_trainable and not caps.schedule_ends:  # a schedule that redraws what trains (LISA)
            active = sum(any(p.requires_grad for p in b.module.parameters()) for b in anat.blocks)
            notes.append(f"planned with {active} of {len(anat.blocks)} blocks training: the schedule's first draw "
                         "(every draw trains as many)")
        memory = _distribute(memory, settings, notes, layout)
        plan = MethodPlan(method, _label(type(session.method), opts), opts, memory, notes)
        plan.needed = memory["step_peak"] + allowance_bytes(memory["step_peak"], settings)
        if device_memory is not None:
            plan.fits = plan.needed <= device_memory
            def needed(b: int, n: int) -> int:
                peak = _distribute(session.measure(b, n), settings, [], layout)["step_peak"]
                return peak + allowance_bytes(peak, settings)

            plan.max_batch_size = _largest(lambda b: needed(b, settings.seq_len), device_memory,
                                           start=settings.batch_size, cap=1 << 16)
            plan.max_seq_len = _largest(lambda n: needed(settings.batch_size, n), device_memory,
                                        start=settings.seq_len, cap=source.max_positions or (1 << 20))
    finally:
        session.close()
    return plan


def _largest(needed, budget: int, start: int, cap: int) -> int | None:
    """The largest n in [1, cap] with needed(n) <= budget (needed grows with n), found by doubling from a fit
    and bisecting; None when even 1 does not fit. ``start`` is a first guess."""
    cache: dict[int, bool] = {}

    def fits(n: int) -> bool:
        if n not in cache:
            cache[n] = needed(n) <= budget
        return cache[n]

    lo = min(max(1, start), cap)
    if not fits(lo):
        hi = lo
        lo = 1
        if not fits(1):
            return None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo
    hi = lo
    while fits(hi):
        lo = hi
        if hi >= cap:
            return cap
        hi = min(cap, hi * 2)
    while hi - lo > max(1, lo // 64):  # within 1.5 %: each probe is a whole traced step
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def compare_methods(model: str, settings: PlanSettings, methods: list[str] | None = None,
                    options: dict | None = None, device_memory: int | None = None, progress=None) -> list[MethodPlan]:
    """Every registered method (or ``methods``), with the bench's settings per method; a method that refuses
    this model gets a row with its reason."""
    from ..methods import list_methods

    source = resolve_model(model)
    names = methods or [cls.name for cls in list_methods()]
    out = []
    for name in names:
        if progress is not None:
            progress(name)
        try:
            out.append(plan_method(source, name, options, settings, device_memory=device_memory, bench_settings=True))
        except (ValueError, RuntimeError, NotImplementedError) as e:
            out.append(MethodPlan(name, name, options or {}, {}, error=str(e).splitlines()[0]))
    return out


def cheapest(plans: list[MethodPlan]) -> MethodPlan | None:
    ok = [p for p in plans if p.error is None]
    return min(ok, key=lambda p: p.memory["step_peak"]) if ok else None


def parse_bytes(text: str) -> int:
    """``24GB``, ``24GiB``, ``80G``, ``512MiB``, ``1000000`` -> bytes (GB = GiB: device memory is told in GiB)."""
    t = text.strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "TB": 2**40, "T": 2**40, "GIB": 2**30, "GB": 2**30, "G": 2**30, "MIB": 2**20, "MB": 2**20,
             "M": 2**20, "KIB": 2**10, "KB": 2**10, "K": 2**10, "B": 1}
    unit = next((u for u in units if t.endswith(u)), None)
    number, mult = (t[: -len(unit)], units[unit]) if unit else (t, 1)
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"--device-memory {text!r}: give a size like 24GB, 80GiB or 512MiB") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--device-memory {text!r} must be a positive size")
    return int(value * mult)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, mult in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= mult:
            return f"{n / mult:.2f} {unit}"
    return f"{n} B"


def peak_curve(model: str | ModelSource, method: str, options: dict | None, settings: PlanSettings,
               lengths: list[int], bench_settings: bool = True) -> list[int]:
    """step_peak at each sequence length (one traced model, one measured step per length)."""
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    planned, _ = prepare(source, method, method_options(method, options, bench_settings), settings)
    session, _ = _open(source, method, planned, settings)
    try:
        return [session.measure(settings.batch_size, n)["step_peak"] for n in lengths]
    finally:
        session.close()
