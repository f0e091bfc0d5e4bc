"""An adapter bank: many named adapters on one base model, served side by side in one batch.

``bank.add(name, folder)`` reads an adapter and keeps it as data. A method whose capabilities say ``mixed_batch``
gives its fine-tune as bank terms (``methods/terms.py``); every layer any adapter touches gets one installed forward
that computes, for each row of the batch, that row's adapter with batched gathers (no loop over adapters):

  low-rank (LoRA)   A and B stacked over adapters (padded to the largest rank), gathered per row: two ``bmm``
  columns (S²FT)    a per-row gather of the k input columns, ``bmm`` with the stacked D blocks (padded k)
  rows (S²FT)       ``bmm`` with the stacked D blocks, ``scatter_add_`` into the k output rows
  scales ((IA)³)    the input / output multiplied by the row's gathered vector (ones for other rows)
  bias (BitFit)     the row's gathered bias change added

Slot 0 of every stack is zero (or ones for scales): rows of the base (name None) and of adapters that do not touch
a layer gather it. DoRA is an output scale, a low-rank term and a bias term (``Lora.bank_terms``). A mergeable
method without terms (KronA, full, LN tuning) is kept as the merged values of
the tensors it changes and served through the switch only: ``forward`` / ``generate`` run its rows as their own
group. ``switch(name)`` folds one adapter into the weights (the fast path when a whole batch uses one adapter) and
keeps the original values of what it changed, so switching back gives the base bitwise: S²FT's k columns
(``index_add_``, cost independent of the layer's width), whole weights for LoRA and the scales. ``fuse`` makes a
weighted sum of adapters as a new one.

On a quantized base (bitsandbytes 4-bit / LLM.int8 layers, ``leantune.quant``) nothing is ever merged into a
quantized weight (that would re-quantize the update): a mixed-batch adapter is served through its terms on top of
the quantized layer's output also when it has the whole batch (no switch fast path), and a switch-only adapter whose
merge would write into a quantized layer (KronA) is served *attached*: its method applied unmerged to the base
while its group runs and removed after (checked at ``add`` to give the base back bitwise; else refused with the
reason). One whose merge touches only full-precision tensors (LN tuning: norms) keeps the switch.
"""

from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..anatomy import is_conv1d, is_quantized_layer, weight_2d
from ..data.encode import left_pad
from ..files import AdapterError
from ..methods import fused
from ..methods.terms import Bias, Columns, InScale, LowRank, OutScale, Rows
from ..quant import QuantizedMergeError, is_quantized_model, refuse_quantized_merge

NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
BASE = "base"  # what the server calls the base model; in the bank the base is None
_BANK = "_leantune_bank_layer"
_KINDS = (LowRank, Columns, Rows, InScale, OutScale, Bias)


def check_name(name: str) -> str:
    """An adapter name: letters, digits, ``.``, ``_``, ``-`` (never a path), not ``base`` and not only dots."""
    if not isinstance(name, str) or not NAME_RE.match(name) or set(name) == {"."}:
        raise ValueError(f"adapter name {name!r} is not allowed: use letters, digits, '.', '_' and '-' only "
                         "(a name is never a path)")
    if name == BASE:
        raise ValueError(f"adapter name {BASE!r} is reserved for the base model; choose another name")
    return name


@dataclass
class BankAdapter:
    name: str
    method: str
    terms: dict[str, list] | None  # layer name -> bank terms (mixed-batch adapters)
    replace: dict[str, torch.Tensor] | None = None  # parameter name -> merged value (switch-only adapters)
    source: str = ""
    # a switch-only adapter on a quantized base, served unmerged: (method class, config, state), applied at switch
    attached: tuple | None = None

    @property
    def mixed(self) -> bool:
        return self.terms is not None


@dataclass
class _Stacks:
    """One layer's terms of one kind, stacked over the adapters that have one (slot 0: the neutral term)."""

    table: torch.Tensor  # adapter number -> slot
    tensors: tuple[torch.Tensor, ...]


@dataclass
class _Slots:
    """The slot of every row of the batch for one kind of term on one layer; ``start`` when the rows take
    consecutive slots in order (``start, start + 1, ...``): the stacks are then read as a view, no gather."""

    idx: torch.Tensor
    start: int | None
    group: _Group | None = None  # when slots repeat: the rows laid out by distinct slot

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t.narrow(0, self.start, self.idx.shape[0]) if self.start is not None else t.index_select(0, self.idx)


@dataclass
class _Group:
    """Rows laid out on a grid of (distinct slot, k-th row of it): ``fill`` (the row at every grid place; spare
    places repeat row 0, their results are never read) and ``place`` (every row's place). A low-rank term then
    gathers each distinct adapter once instead of once per row (SGMV-like, padded to the largest count)."""

    slots: torch.Tensor  # the distinct slots
    per: int  # rows per slot on the grid (the largest count)
    fill: torch.Tensor
    place: torch.Tensor


def _grouping(s: list[int], device) -> _Group | None:
    distinct = sorted(set(s))
    if len(distinct) == len(s):
        return None
    pos = {v: i for i, v in enumerate(distinct)}
    per = max(s.count(v) for v in distinct)
    fill, place, seen = [0] * (len(distinct) * per), [], {}
    for row, v in enumerate(s):
        p = pos[v] * per + seen.get(v, 0)
        seen[v] = seen.get(v, 0) + 1
        fill[p] = row
        place.append(p)
    as_t = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return _Group(as_t(distinct), per, as_t(fill), as_t(place))


@dataclass
class _Layer:
    module: nn.Module
    handle: fused.ForwardHandle
    stacks: dict[type, _Stacks] = field(default_factory=dict)
    slots: dict[type, _Slots] = field(default_factory=dict)  # per kind, the slot of every row of the batch


class AdapterBank:
    """Named adapters on one plain base model (a model that carries no leantune method)."""

    def __init__(self, model: nn.Module):
        if getattr(model, "leantune_method", None) is not None:
            raise ValueError("AdapterBank takes a plain base model; this one carries method "
                             f"{model.leantune_method.name!r} (load a fresh base)")
        self.model = model
        self.adapters: dict[str, BankAdapter] = {}
        self._numbers: dict[str, int] = {}  # name -> adapter number (1..); 0 is the base
        self._layers: dict[str, _Layer] = {}
        self._dirty = True
        self._rows: torch.Tensor | None = None  # adapter number per row while a mixed batch runs
        self._current: str | None = None  # the adapter switched into the weights
        self._undo: list = []
        self._slots_of: tuple | None = None  # (adapter numbers of the rows, {layer: slots}) of the last mixed batch
        self._installed = True  # the bank's layer forwards are on (off while an attached adapter is applied)
        self.quantized = is_quantized_model(model)  # never merge into its quantized layers

    # -- adapters ---------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.adapters)

    def add(self, name: str, folder) -> BankAdapter:
        """Read the adapter in ``folder`` (a leantune or PEFT LoRA folder; safetensors only) as ``name``."""
        check_name(name)
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already in the bank; remove it first or choose another name")
        from ..api import load
        from ..interop.peft import is_peft_folder
        from ..io import read_meta
        from ..methods.base import get_method

        mixed = True  # a PEFT folder is LoRA: it has terms unless it is DoRA (asked after loading)
        if not is_peft_folder(folder):
            meta = read_meta(folder)
            try:
                cls = get_method(meta["method"])
            except KeyError as e:
                raise AdapterError(f"{folder}: {e.args[0]}") from None
            caps = cls(cls.config_cls.from_dict(meta["config"], method=meta["method"])).capabilities
            if not caps.mixed_batch and not caps.mergeable:
                raise ValueError(f"adapter {name!r} ({folder}): method {meta['method']!r} can neither share a batch "
                                 "with other adapters nor be merged, so a bank cannot serve it; serve it alone")
            mixed = caps.mixed_batch
        with self._detached():
            adapter = None
            if mixed:
                method = load(self.model, folder)
                terms = method.bank_terms() if method.capabilities.mixed_batch else None
                if terms is not None:
                    terms = {n: [_clone(t) for t in ts] for n, ts in terms.items()}
                    adapter = BankAdapter(name, method.name, terms, source=str(folder))
                method.remove()  # applied, never merged: the base back bitwise (the bank_terms contract)
            if adapter is None:
                adapter = self._switch_only(name, folder)
        self._put(adapter)
        return adapter

    def _switch_only(self, name, folder) -> BankAdapter:
        """A switch-only adapter: its merged values, or on a quantized base where its merge would write into a
        quantized layer, the adapter served attached (unmerged)."""
        try:
            return self._merged_values(name, folder)
        except QuantizedMergeError:  # raised on a quantized base only
            return self._attached(name, folder)

    def _attached(self, name, folder) -> BankAdapter:
        """A switch-only adapter on a quantized base, kept as its method, config and state, applied unmerged at
        switch. Refused unless its removal gives the base back bitwise (checked here, on a copy of the base)."""
        from ..api import load

        scratch = copy.deepcopy(self.model)
        before = {n: t.clone() for n, t in scratch.state_dict().items()}
        m = load(scratch, folder)
        cls, config, state = type(m), m.config, {k: v.detach().clone() for k, v in m.state().items()}
        try:
            m.remove()
        except (NotImplementedError, RuntimeError) as e:
            raise ValueError(f"adapter {name!r} ({folder}): method {m.name!r} cannot be merged into a quantized base "
                             f"and cannot be taken off it ({e}), so a bank cannot serve it; serve it alone") from None
        after = scratch.state_dict()
        if after.keys() != before.keys() or any(not torch.equal(after[k], before[k]) for k in before):
            raise ValueError(f"adapter {name!r} ({folder}): method {m.name!r} cannot be merged into a quantized base "
                             "and taking it off does not give the base back exactly, so a bank cannot serve it; "
                             "serve it alone")
        return BankAdapter(name, m.name, None, source=str(folder), attached=(cls, config, state))

    def _merged_values(self, name, folder) -> BankAdapter:
        """A mergeable method without terms: the merged values of what it changes, from a copy of the base (the
        bank's base is never touched by it; the copy lives while this runs)."""
        from ..api import load

        scratch = copy.deepcopy(self.model)
        m = load(scratch, folder)
        if not m.capabilities.mergeable:
            raise ValueError(f"adapter {name!r} ({folder}): method {m.name!r} has no mixed-batch form and cannot "
                             "be merged, so a bank cannot serve it; serve it alone")
        probe = torch.randint(3, scratch.get_input_embeddings().num_embeddings, (1, 8), generator=torch.Generator()
                              .manual_seed(0)).to(next(scratch.parameters()).device)
        with torch.no_grad():
            want = scratch(input_ids=probe).logits.float()
            plain = m.merge_and_unload()
            got = plain(input_ids=probe).logits.float()
        # the switch serves the merged form: it must compute what the method computes (an fp32 merge rounds ~1e-6)
        tol = (1e-4 if got.dtype == torch.float32 and next(plain.parameters()).dtype == torch.float32 else 5e-2)
        err = float((got - want).abs().max())
        if err > tol * (1 + float(want.abs().max())):
            raise ValueError(f"adapter {name!r}: method {m.name!r}'s merged form does not compute what the adapter "
                             f"computes (max |logit difference| {err:.3g} on a probe), so a bank cannot switch it in; "
                             "serve it alone")
        base = dict(self.model.named_parameters())
        quantized = {f"{n}.weight" for n, mod in self.model.named_modules() if is_quantized_layer(mod)}
        replace = {}
        for n, p in plain.named_parameters():
            if n in quantized and (base[n].shape != p.shape or not torch.equal(base[n], p)):
                # a merge that dequantized or re-quantized a packed weight (LISA's blocks, PEFT's bnb merge)
                raise QuantizedMergeError(f"adapter {name!r}: method {m.name!r}'s merge changes the quantized {n}")
            if n not in base or base[n].shape != p.shape:
                raise ValueError(f"adapter {name!r}: method {m.name!r} changes the architecture ({n}); a bank "
                                 "serves adapters that keep the base's shapes")
            if not torch.equal(base[n], p):
                replace[n] = p.detach().clone()
        return BankAdapter(name, m.name, None, replace, source=str(folder))

    def _put(self, adapter: BankAdapter) -> None:
        self.adapters[adapter.name] = adapter
        self._numbers = {n: i + 1 for i, n in enumerate(self.adapters)}
        self._dirty = True

    def remove(self, name: str) -> None:
        self._adapter(name)
        if self._current == name:
            self.switch(None)
        del self.adapters[name]
        self._numbers = {n: i + 1 for i, n in enumerate(self.adapters)}
        self._dirty = True

    def _number(self, name: str | None) -> int:
        return 0 if name is None else self._numbers[name]

    def _adapter(self, name: str) -> BankAdapter:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r} in the bank; known: {', '.join(self.adapters) or 'none'}")
        return self.adapters[name]

    @contextlib.contextmanager
    def _detached(self):
        """The plain base for a while (nothing switched in, no bank forwards): to apply a method to it."""
        self.switch(None)
        self._uninstall()
        self._layers = {}
        self._installed = True
        self._dirty = True
        yield

    def _uninstall(self) -> None:
        """The bank's layer forwards off (their stacks kept): ``_build`` puts them back."""
        if self._installed:
            for layer in self._layers.values():
                layer.handle.remove()
                layer.module.__dict__.pop(_BANK, None)
        self._installed = False

    # -- the installed forwards -----------------------------------------------------------------------------
    def _build(self) -> None:
        if not self._installed:  # an attached adapter was applied meanwhile: the layers' forwards back on
            for lname, layer in self._layers.items():
                layer.handle = fused.override_forward(layer.module, _bank_forward)
                layer.module.__dict__[_BANK] = (self, lname)
            self._installed = True
        if not self._dirty:
            return
        modules = dict(self.model.named_modules())
        per_layer: dict[str, dict[type, list]] = {}
        for a in self.adapters.values():
            for lname, terms in (a.terms or {}).items():
                for t in terms:
                    per_layer.setdefault(lname, {}).setdefault(type(t), []).append((self._numbers[a.name], t))
        for lname in list(self._layers):
            if lname not in per_layer:
                layer = self._layers.pop(lname)
                layer.handle.remove()
                layer.module.__dict__.pop(_BANK, None)
        for lname, kinds in per_layer.items():
            if lname not in self._layers:
                if lname not in modules:
                    raise ValueError(f"the bank's base has no module {lname!r}")
                mod = modules[lname]
                self._layers[lname] = _Layer(mod, fused.override_forward(mod, _bank_forward))
                mod.__dict__[_BANK] = (self, lname)
            layer = self._layers[lname]
            layer.stacks = {kind: _stack(kind, entries, len(self.adapters) + 1, layer.module)
                            for kind, entries in kinds.items()}
        self._slots_of = None
        self._dirty = False

    def _row_slots(self, numbers: tuple[int, ...], device) -> dict[str, dict[type, _Slots]]:
        """Per layer and kind, the slot of every row (kinds no row uses left out); the last batch's is kept (a
        decode loop asks for the same rows at every step)."""
        if self._slots_of is not None and self._slots_of[0] == numbers:
            return self._slots_of[1]
        out = {}
        for lname, layer in self._layers.items():
            per = {}
            for kind, st in layer.stacks.items():
                table = st.table.tolist()
                s = [table[a] for a in numbers]
                if not any(s):
                    continue
                start = s[0] if s[0] > 0 and s == list(range(s[0], s[0] + len(s))) else None
                per[kind] = _Slots(torch.tensor(s, device=device), start, _grouping(s, device) if kind is LowRank else None)
            out[lname] = per
        self._slots_of = (numbers, out)
        return out

    @contextlib.contextmanager
    def using(self, names: list[str | None], switch: bool = True):
        """Run the model with one adapter per row (None: the base) inside this block. One adapter for every row
        (or the base for all) takes the fast path: switched into the weights (``switch=False``: computed as terms
        all the same, when a short forward would cost less than folding the adapter in and out). Otherwise every
        name must be an adapter that shares a batch (``mixed``)."""
        names = list(names)
        distinct = set(names)
        for n in distinct - {None}:
            self._adapter(n)
        one = names[0] if len(distinct) == 1 else False
        if one is not False:
            # one adapter (or the base) for every row: switched in, unless its terms are asked for (switch=False)
            # or the base is quantized (a mixed adapter then keeps its terms: never merged into packed weights)
            terms = one is not None and self.adapters[one].mixed and (not switch or self.quantized)
            if not terms:
                self.switch(one)
                yield
                return
        switch_only = sorted(n for n in distinct - {None} if not self.adapters[n].mixed)
        if switch_only:
            raise ValueError(f"adapters {switch_only} are served through the switch only (their method has no "
                             "mixed-batch form): give them batches of their own (forward() and generate() group them)")
        self.switch(None)
        self._build()
        device = next(self.model.parameters()).device
        numbers = tuple(self._number(n) for n in names)
        for lname, slots in self._row_slots(numbers, device).items():
            self._layers[lname].slots = slots
        self._rows = torch.tensor(numbers, device=device)
        try:
            yield
        finally:
            self._rows = None
            for layer in self._layers.values():
                layer.slots = {}

    def groups(self, names: list[str | None]) -> list[list[int]]:
        """Row numbers that can run together: every mixed-batch adapter and the base in one group, each switch-only
        adapter in its own."""
        out: dict[str | None, list[int]] = {}
        for i, n in enumerate(names):
            key = n if n is not None and not self._adapter(n).mixed else ""
            out.setdefault(key, []).append(i)
        return list(out.values())

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, names: list[str | None], attention_mask=None, **kwargs) -> torch.Tensor:
        """Logits of ``model(input_ids)`` with row i run through adapter ``names[i]``."""
        if len(names) != input_ids.shape[0]:
            raise ValueError(f"{len(names)} adapter names for a batch of {input_ids.shape[0]} rows")
        # rows of one adapter together, adapters in the bank's order: rows on consecutive slots read them as views
        groups = [sorted(g, key=lambda i: self._number(names[i])) for g in self.groups(names)]
        if len(groups) == 1 and groups[0] == list(range(len(names))):  # one batch, in order: the logits as they come
            with self.using(names):
                return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        out = None
        for rows in groups:
            idx = torch.tensor(rows, device=input_ids.device)
            mask = None if attention_mask is None else attention_mask[idx]
            with self.using([names[i] for i in rows]):
                logits = self.model(input_ids=input_ids[idx], attention_mask=mask, **kwargs).logits
            if out is None:
                out = logits.new_empty((input_ids.shape[0], *logits.shape[1:]))
            out[idx] = logits
        return out

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], names: list[str | None], max_new_tokens: int, *,
                 pad_token_id: int, eos_token_id: int | None = None) -> list[list[int]]:
        """Greedy continuations (token ids) of tokenized prompts, row i through adapter ``names[i]``: left-padded,
        with the model's KV cache, each group of :meth:`groups` as one batch."""
        if len(names) != len(prompts):
            raise ValueError(f"{len(names)} adapter names for {len(prompts)} prompts")
        if getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
            raise ValueError("AdapterBank.generate continues causal LMs; this base is an encoder-decoder: call "
                             "forward() with decoder_input_ids (each row still through its own adapter)")
        device = next(self.model.parameters()).device
        out: list[list[int]] = [[] for _ in prompts]
        for rows in self.groups(names):
            rows = sorted(rows, key=lambda i: self._number(names[i]))  # as in forward: consecutive slots as views
            ids, mask = left_pad([prompts[i] for i in rows], pad_token_id)
            width = ids.shape[1]
            with self.using([names[i] for i in rows]):
                gen = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                          max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=pad_token_id, eos_token_id=eos_token_id)
            for j, i in enumerate(rows):
                toks = gen[j, width:].tolist()
                if eos_token_id is not None and eos_token_id in toks:
                    toks = toks[: toks.index(eos_token_id)]
                out[i] = toks
        return out

    # -- switch and fuse -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def switch(self, name: str | None) -> None:
        """Fold adapter ``name`` into the base weights (None: the base, bitwise). What the previous adapter changed
        is restored from the original values kept at its switch (S²FT: k columns), then the new one is added."""
        if name == self._current:
            return
        if name is not None:
            self._adapter(name)
        for undo in reversed(self._undo):
            undo()
        self._undo, self._current = [], None
        if name is None:
            return
        a = self.adapters[name]
        if a.terms is not None and self.quantized:
            raise ValueError(f"adapter {name!r}: the bank's base is quantized, and merging into 4-bit/8-bit weights "
                             "would re-quantize the update; it is served through its terms (using([...]))")
        if a.attached is not None:  # a quantized base: the method applied unmerged while the adapter is current
            cls, config, state = a.attached
            self._uninstall()
            with torch.random.fork_rng(devices=[]):  # the method's init draws (overwritten) leave the caller's RNG be
                m = cls(copy.deepcopy(config)).apply(self.model)
            m.load_state(state)
            for _, p in m.trainable_parameters():
                p.requires_grad_(False)
            self._undo.append(m.remove)
        elif a.terms is not None:
            modules = dict(self.model.named_modules())
            for lname, terms in a.terms.items():
                for t in terms:
                    self._undo.append(_merge_term(modules[lname], t))
        else:
            params = dict(self.model.named_parameters())
            for n, v in a.replace.items():
                p = params[n]
                saved = p.detach().clone()
                p.copy_(v)
                self._undo.append(lambda p=p, saved=saved: p.copy_(saved))
        self._current = name

    @property
    def current(self) -> str | None:
        """The adapter switched into the weights (None: the base)."""
        return self._current

    @torch.no_grad()
    def fuse(self, name: str, weights: dict[str, float]) -> BankAdapter:
        """Add ``name``: the weighted sum of adapters' changes (``{adapter: weight}``). Terms fuse as terms (LoRA:
        ranks concatenated; S²FT: union of indices, blocks summed; scales: ``1 + Σ w (v - 1)``; biases summed), so
        the result shares batches; switch-only adapters fuse as ``base + Σ w (merged - base)``."""
        check_name(name)
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already in the bank")
        if not weights:
            raise ValueError("fuse: give at least one adapter and its weight")
        sources = [(self._adapter(n), float(w)) for n, w in weights.items()]
        kinds = {a.mixed for a, _ in sources}
        if len(kinds) > 1:
            raise ValueError("fuse: mix of mixed-batch and switch-only adapters; fuse adapters of one kind")
        method = "+".join(sorted({a.method for a, _ in sources}))
        attached = sorted(a.name for a, _ in sources if a.attached is not None)
        if attached:
            raise ValueError(f"fuse: adapters {attached} are served unmerged on this quantized base (their merge "
                             "would re-quantize it), so they have no merged values to sum")
        if kinds == {True}:
            fused_terms: dict[str, list] = {}
            for lname in sorted({ln for a, _ in sources for ln in a.terms}):
                per_kind: dict[type, list] = {}
                for a, w in sources:
                    for t in a.terms.get(lname, []):
                        per_kind.setdefault(type(t), []).append((t, w))
                fused_terms[lname] = [_fuse_terms(kind, items) for kind, items in per_kind.items()]
            adapter = BankAdapter(name, method, fused_terms, source="fuse")
        else:
            self.switch(None)
            params = dict(self.model.named_parameters())
            replace = {}
            for pname in sorted({n for a, _ in sources for n in a.replace}):
                base = params[pname].detach()
                acc = base.float().clone()
                for a, w in sources:
                    if pname in a.replace:
                        acc += w * (a.replace[pname].float() - base.float())
                replace[pname] = acc.to(base.dtype)
            adapter = BankAdapter(name, method, None, replace, source="fuse")
        self._put(adapter)
        return adapter


# -- the per-row computation ---------------------------------------------------------------------------------


def _bank_forward(module: nn.Module, base_forward, fusable: bool, x, *args, **kwargs):
    bank, lname = module.__dict__[_BANK]
    layer = bank._layers.get(lname)
    if bank._rows is None or layer is None or not layer.slots:
        return base_forward(x, *args, **kwargs)
    slots, stacks = layer.slots, layer.stacks
    n = bank._rows.shape[0]
    if x.shape[0] != n:
        raise RuntimeError(f"bank: a batch of {x.shape[0]} rows reached {lname}, the adapters were given for {n}")
    x3 = x.reshape(n, -1, x.shape[-1])
    h = x
    if InScale in slots:
        (v,) = stacks[InScale].tensors
        g = slots[InScale].take(v)[:, None, :]
        h = (x3.to(g.dtype) * g).to(x.dtype).view(x.shape)
    y = base_forward(h, *args, **kwargs)
    y3 = y.reshape(n, -1, y.shape[-1])
    # the terms go into the layer's fresh output in place (no full-width temporary); with autograd on, out of place
    inplace = not torch.is_grad_enabled()
    if OutScale in slots:
        (v,) = stacks[OutScale].tensors
        g = slots[OutScale].take(v)[:, None, :]
        y3 = y3.mul_(g) if inplace and y3.dtype == g.dtype else (y3.to(g.dtype) * g).to(y.dtype)
    for kind in (LowRank, Columns, Rows, Bias):
        if kind not in slots:
            continue
        s, ts = slots[kind], stacks[kind].tensors
        dt = ts[-1].dtype
        xt = x3 if x3.dtype == dt else x3.to(dt)
        direct = inplace and y3.dtype == dt
        target = y3 if direct else torch.zeros((*y3.shape[:-1], y3.shape[-1]), dtype=dt, device=y3.device)
        if kind is LowRank:
            at, bt = ts
            g, t = s.group, xt.shape[1]
            if g is not None and 2 * t * g.fill.shape[0] <= (n - g.slots.shape[0]) * at.shape[2]:
                # few tokens, repeated adapters (decoding): copying the rows onto the grid costs less than
                # gathering every row's A and B; each distinct adapter's A and B gathered once
                u, m = g.slots.shape[0], g.per
                xg = xt.index_select(0, g.fill).view(u, m * t, xt.shape[-1])
                z = torch.bmm(torch.bmm(xg, at.index_select(0, g.slots)), bt.index_select(0, g.slots))
                target.add_(z.view(u * m, t, -1).index_select(0, g.place))
            else:  # BGMV: each row's A and B gathered (or read as a view), two batched products
                target.baddbmm_(torch.bmm(xt, s.take(at)), s.take(bt))
        elif kind is Columns:  # the row's k input columns, times its D block
            idx, d = ts
            ri = s.take(idx)
            cols = torch.gather(xt, 2, ri[:, None, :].expand(n, xt.shape[1], ri.shape[1]))
            target.baddbmm_(cols, s.take(d))
        elif kind is Rows:  # x times the row's D block, into its k output rows
            idx, d = ts
            ri = s.take(idx)
            part = torch.bmm(xt, s.take(d))
            target.scatter_add_(2, ri[:, None, :].expand_as(part), part)
        else:
            (b,) = ts
            target.add_(s.take(b)[:, None, :])
        if not direct:
            y3 = y3 + target.to(y3.dtype)
    return y3.reshape(*y.shape[:-1], y3.shape[-1])


def _stack(kind: type, entries: list, n_adapters: int, module: nn.Module) -> _Stacks:
    """Stack one kind of term over adapters, padded to the largest rank / k (zeros add nothing)."""
    table = torch.zeros(n_adapters, dtype=torch.long)
    for slot, (number, _t) in enumerate(entries, start=1):
        table[number] = slot
    terms = [t for _, t in entries]
    s = len(terms) + 1
    ref = next(iter(module.parameters()))
    device = ref.device
    if kind is LowRank:
        r = max(t.A.shape[0] for t in terms)
        in_f, out_f = terms[0].A.shape[1], terms[0].B.shape[0]
        dt = terms[0].A.dtype
        at = torch.zeros(s, in_f, r, dtype=dt, device=device)
        bt = torch.zeros(s, r, out_f, dtype=dt, device=device)
        for i, t in enumerate(terms, start=1):
            k = t.A.shape[0]
            at[i, :, :k] = t.A.t()
            bt[i, :k, :] = (t.B * t.scale).t()  # the scale folded into B
        return _Stacks(table, (at, bt))
    if kind in (Columns, Rows):
        k = max(len(t.idx) for t in terms)
        dt = terms[0].D.dtype
        idx = torch.zeros(s, k, dtype=torch.long, device=device)
        if kind is Columns:
            d = torch.zeros(s, k, terms[0].D.shape[0], dtype=dt, device=device)  # (k, out) per slot: x_cols @ Dᵀ
        else:
            d = torch.zeros(s, terms[0].D.shape[1], k, dtype=dt, device=device)  # (in, k) per slot: x @ Dᵀ
        for i, t in enumerate(terms, start=1):
            m = len(t.idx)
            idx[i, :m] = t.idx
            if kind is Columns:
                d[i, :m, :] = t.D.t()
            else:
                d[i, :, :m] = t.D.t()
        return _Stacks(table, (idx, d))
    vecs = [t.v if kind in (InScale, OutScale) else t.b for t in terms]
    neutral = torch.ones_like(vecs[0]) if kind in (InScale, OutScale) else torch.zeros_like(vecs[0])
    return _Stacks(table, (torch.stack([neutral, *vecs]).to(device),))


def _clone(t):
    if isinstance(t, LowRank):
        return LowRank(t.A.detach().clone(), t.B.detach().clone(), float(t.scale))
    if isinstance(t, (Columns, Rows)):
        return type(t)(t.idx.detach().long().clone(), t.D.detach().clone())
    if isinstance(t, (InScale, OutScale)):
        return type(t)(t.v.detach().clone())
    if isinstance(t, Bias):
        return Bias(t.b.detach().clone())
    raise TypeError(f"unknown bank term {type(t).__name__}; the bank computes {[k.__name__ for k in _KINDS]}")


def _fuse_terms(kind: type, items: list):
    """Weighted sum of terms of one kind on one layer."""
    if kind is LowRank:
        a = torch.cat([t.A.float() for t, _ in items])
        b = torch.cat([t.B.float() * (w * t.scale) for t, w in items], dim=1)
        return LowRank(a, b, 1.0)
    if kind in (Columns, Rows):
        dim = 1 if kind is Columns else 0
        union = torch.unique(torch.cat([t.idx for t, _ in items]))
        shape = list(items[0][0].D.shape)
        shape[dim] = len(union)
        d = torch.zeros(shape, dtype=torch.float32, device=items[0][0].D.device)
        for t, w in items:
            d.index_add_(dim, torch.searchsorted(union, t.idx), t.D.float(), alpha=w)
        return kind(union, d)
    if kind in (InScale, OutScale):
        v = torch.ones_like(items[0][0].v, dtype=torch.float32)
        for t, w in items:
            v += w * (t.v.float() - 1)
        return kind(v)
    b = torch.zeros_like(items[0][0].b, dtype=torch.float32)
    for t, w in items:
        b += w * t.b.float()
    return Bias(b)


# -- folding a term into the weights (the switch) -------------------------------------------------------------


def _merge_term(mod: nn.Module, t):
    """Add term ``t`` into ``mod``'s weights; return what undoes it bitwise (from the original values kept here)."""
    refuse_quantized_merge(mod, "bank switch")
    w = mod.weight
    if isinstance(t, (Columns, Rows)):
        dim = 1 if isinstance(t, Columns) else 0
        d = t.D
        if is_conv1d(mod):  # (in, out) storage: the (out, in) columns are contiguous stored rows
            dim, d = 1 - dim, d.t()
        idx = t.idx.to(w.device)
        saved = w.index_select(dim, idx)
        w.index_add_(dim, idx, d.to(w.dtype))
        return lambda: w.index_copy_(dim, idx, saved)
    if isinstance(t, Bias):
        if mod.bias is None:
            mod.bias = nn.Parameter(t.b.to(w.dtype, copy=True).to(w.device), requires_grad=False)

            def drop():
                del mod.bias
                mod.register_parameter("bias", None)

            return drop
        b = mod.bias
        saved_b = b.detach().clone()
        b.copy_((b.float() + t.b.to(b.device)).to(b.dtype))
        return lambda: b.copy_(saved_b)
    saved = w.detach().clone()
    saved_bias = mod.bias.detach().clone() if isinstance(t, OutScale) and mod.bias is not None else None
    w2d = weight_2d(mod)
    if isinstance(t, LowRank):
        delta = t.dense().to(w.device)
        w.add_((delta.t() if is_conv1d(mod) else delta).to(w.dtype))
    elif isinstance(t, InScale):
        w2d.copy_((w2d.float() * t.v.to(w.device)[None, :]).to(w.dtype))
    elif isinstance(t, OutScale):
        v = t.v.to(w.device)
        w2d.copy_((w2d.float() * v[:, None]).to(w.dtype))
        if mod.bias is not None:
            mod.bias.copy_((mod.bias.float() * v).to(mod.bias.dtype))
    else:
        raise TypeError(f"unknown bank term {type(t).__name__}")

    def undo():
        w.copy_(saved)
        if saved_bias is not None:
            mod.bias.copy_(saved_bias)

    return undo
