"""The generation engine behind the server: one thread that owns the adapter bank and decodes every request it holds
in one mixed batch, a step at a time (continuous batching: a finished row leaves after its step, a waiting request
joins at the next one).

Each row picks its tokens with its own parameters (``next_tokens``: its logit bias and presence / frequency penalties
first, then greedy at temperature 0, else a draw with its own seeded generator, nucleus top_p), records the chosen
token's log-probability and its top alternatives when asked (``logprobs``), and finishes at EOS, at a stop string or
at its token limit.

KV cache per group of rows: a step drops the rows that finished from the group's cache (and the leading positions
no row attends to any more), feeds each row in it its last token, and prefills only the rows that joined (their
whole sequence, left-padded among themselves, through the bank's terms rather than a switch) and appends them to
the cache, the narrower side left-padded with masked positions. Requests whose adapters are served through the
switch only (no mixed-batch form) step as their own group; groups take turns of ``Limits.group_steps`` steps, so
such a group switches in and out once per turn rather than once per step. Steps run without autograd.
"""

from __future__ import annotations

import collections
import itertools
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..data.encode import left_pad
from .bank import AdapterBank


@dataclass
class Limits:
    """What one request may ask for, and how many may wait (documented in docs/serving.md)."""

    max_new_tokens: int = 256  # the most tokens a request may generate
    default_new_tokens: int = 64  # when the request names none (at most max_new_tokens)
    max_prompt_tokens: int = 1024  # prompt tokens (after the chat template and BOS)
    queue_size: int = 256  # requests waiting or running; one more is refused with 429
    request_timeout_s: float = 120.0  # from arrival to the last token
    max_batch: int = 32  # rows decoded together in one step
    # consecutive steps a group keeps its turn while other groups wait: a switch-only adapter's group pays a switch
    # in and out (on a quantized base an apply and a removal) per turn, not per step
    group_steps: int = 4

    def __post_init__(self):
        for name in ("max_new_tokens", "default_new_tokens", "max_prompt_tokens", "queue_size", "max_batch",
                     "group_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"serve limit {name} must be a positive integer, got {value!r}")
        self.default_new_tokens = min(self.default_new_tokens, self.max_new_tokens)
        if not self.request_timeout_s > 0:
            raise ValueError(f"request timeout must be > 0 seconds, got {self.request_timeout_s!r}")


@dataclass
class _Cohort:
    """A group's KV cache: its rows in cache order, and the attention mask over the cached positions."""

    rows: list
    cache: object
    mask: torch.Tensor


def _appendable(cache) -> bool:
    """A cache whose layers are plain growing key / value tensors (transformers' DynamicLayer): rows can be
    appended and left-padded. Others (sliding windows, static or quantized caches) make a joining step prefill
    every row again."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(la) is DynamicLayer and la.is_initialized and la.keys.dim() == 4 for la in layers)


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` with zeros before its entries along ``dim`` (-2 for keys / values, -1 for masks) up to ``width``."""
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    pad = [0, 0] * (-dim - 1) + [extra, 0]
    return torch.nn.functional.pad(t, pad)


def _append(co: _Cohort, new: _Cohort) -> None:
    """Rows of ``new`` appended to ``co`` (cache and mask), the narrower side left-padded (masked out)."""
    width = max(co.mask.shape[1], new.mask.shape[1])
    for la, lb in zip(co.cache.layers, new.cache.layers, strict=True):
        la.keys = torch.cat([_left_pad(la.keys, width, -2), _left_pad(lb.keys, width, -2)])
        la.values = torch.cat([_left_pad(la.values, width, -2), _left_pad(lb.values, width, -2)])
    co.mask = torch.cat([_left_pad(co.mask, width, -1), _left_pad(new.mask, width, -1)])
    co.rows = co.rows + new.rows


def _trim(co: _Cohort) -> None:
    """Drop leading positions no row attends to any more (left by rows that finished)."""
    if not co.rows or not _appendable(co.cache):
        return
    first = int(co.mask.any(0).int().argmax())
    if first > 0:
        for la in co.cache.layers:
            la.keys, la.values = la.keys[..., first:, :], la.values[..., first:, :]
        co.mask = co.mask[:, first:]


def refuse_encoder_decoder(model) -> None:
    """The engine decodes causal LMs (the prompt and the tokens so far as one sequence, one KV cache); an
    encoder-decoder (T5 and kin) would need its encoder's output beside a decoder cache: refused, saying so."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        name = getattr(config, "name_or_path", "") or type(model).__name__
        raise ValueError(f"{name} is an encoder-decoder model ({getattr(config, 'model_type', '?')}); leantune serve "
                         "serves decoder-only (causal) models only. Use `leantune generate` for it, or the adapter "
                         "bank's forward with decoder_input_ids")


class QueueFull(RuntimeError):
    pass


@dataclass
class Request:
    prompt: list[int]
    adapter: str | None
    max_new_tokens: int
    on_token: Callable[[int | None, str | None], None]  # (token, None) per token; (None, finish reason or error)
    deadline: float
    tokens: list[int] = field(default_factory=list)
    number: int = 0
    temperature: float = 0.0  # 0: greedy (argmax); else a draw from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus: draw among the most likely tokens whose probabilities reach top_p
    seed: int | None = None  # the row's own generator; None: a fresh random seed
    stop: tuple[str, ...] = ()  # finish ("stop") once the decoded text contains one of these
    decode: Callable[[list[int]], str] | None = None  # token ids -> text (needed with ``stop``)
    presence_penalty: float = 0.0  # subtracted from the logit of every token the row has generated
    frequency_penalty: float = 0.0  # times the number of times the row has generated it, subtracted too
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit at every step
    logprobs: int | None = None  # None: none; k: every token's log-probability and its k most likely alternatives
    # one (token, log-probability, [(alternative, log-probability)] * k) per generated token, filled before on_token
    token_logprobs: list = field(default_factory=list)
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self):
        if self.stop and self.decode is None:
            raise ValueError("a request with stop strings needs a decode function (token ids -> text)")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0 alternatives, got {self.logprobs}")
        self.generator = torch.Generator().manual_seed(self.seed if self.seed is not None else secrets.randbits(63))

    def stopped(self) -> bool:
        """Whether the text so far contains a stop string."""
        if not self.stop:
            return False
        text = self.decode(self.tokens)
        return any(s in text for s in self.stop)


def adjusted_logits(logits: torch.Tensor, rows: list[Request]) -> torch.Tensor:
    """The rows' logits (rows, vocab) with each row's ``logit_bias`` added and its penalties subtracted, OpenAI's
    way over the tokens the row has generated so far (not its prompt): ``presence_penalty`` once for every token it
    has generated, ``frequency_penalty`` times the number of times it has. Rows that ask for none: unchanged."""
    todo = [i for i, r in enumerate(rows)
            if r.logit_bias or (r.tokens and (r.presence_penalty or r.frequency_penalty))]
    if not todo:
        return logits
    out = logits.float().clone()
    vocab = out.shape[-1]
    for i in todo:
        r = rows[i]
        if r.logit_bias:
            ids = torch.tensor(list(r.logit_bias), dtype=torch.long, device=out.device)
            out[i].index_add_(0, ids, torch.tensor(list(r.logit_bias.values()), dtype=out.dtype, device=out.device))
        if r.tokens and (r.presence_penalty or r.frequency_penalty):
            counts = torch.bincount(torch.tensor(r.tokens, device=out.device), minlength=vocab)[:vocab].to(out.dtype)
            out[i] -= r.frequency_penalty * counts + r.presence_penalty * (counts > 0).to(out.dtype)
    return out


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[tuple]:
    """(token, its log-probability, its k most likely alternatives as [(token, log-probability)]) under the
    model's distribution at that position (``log_softmax`` of the raw logits: before bias, penalties, temperature
    and top_p, as vLLM reports them by default)."""
    lp = torch.log_softmax(logits.float(), -1)
    top = lp.topk(min(k, lp.shape[-1])) if k else None
    return [(t, float(lp[i, t]), [] if top is None else list(zip(top.indices[i].tolist(), top.values[i].tolist(),
                                                                      strict=True)))
            for i, t in enumerate(tokens)]


def next_tokens(logits: torch.Tensor, rows: list[Request]) -> list[int]:
    """One token per row from its last position's logits (rows, vocab), after the row's bias and penalties
    (``adjusted_logits``): the argmax where the row's temperature is 0; else a draw from
    ``softmax(logits / temperature)`` restricted to the top_p nucleus (the fewest most likely tokens whose
    probabilities reach top_p), by inverting the cumulative distribution at one uniform number from
    the row's own generator, so a seeded request draws the same tokens whatever batch it shares."""
    logits = adjusted_logits(logits, rows)
    out = logits.argmax(-1).tolist()
    sampled = [i for i, r in enumerate(rows) if r.temperature > 0]
    if not sampled:
        return out
    device = logits.device
    temps = torch.tensor([rows[i].temperature for i in sampled], dtype=torch.float64, device=device)
    probs = torch.softmax(logits[torch.tensor(sampled, device=device)].double() / temps[:, None], dim=-1)
    p, order = probs.sort(dim=-1, descending=True, stable=True)
    top = torch.tensor([rows[i].top_p for i in sampled], dtype=torch.float64, device=device)
    p = p * ((p.cumsum(-1) - p) < top[:, None])  # the nucleus: a token stays while the ones before it are < top_p
    c = p.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=rows[i].generator, dtype=torch.float64) for i in sampled]).to(device)
    k = torch.searchsorted(c, (u * c[:, -1])[:, None], right=True).clamp(max=c.shape[-1] - 1)
    for j, tok in zip(sampled, order.gather(1, k)[:, 0].tolist(), strict=True):
        out[j] = tok
    return out


class Engine:
    def __init__(self, bank: AdapterBank, pad_token_id: int, eos_token_id: int | None, limits: Limits | None = None):
        refuse_encoder_decoder(bank.model)
        self.bank = bank
        self.pad, self.eos = pad_token_id, eos_token_id
        self.limits = limits or Limits()
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._calls: collections.deque[tuple[Callable, Future]] = collections.deque()
        self._lock = threading.Condition()
        self._stop = False
        self._numbers = itertools.count()
        self._turn: tuple | None = None  # (the group whose turn it is, the steps it has had in a row)
        self._cohorts: dict = {}
        self.steps = 0
        self.tokens = 0  # generated tokens, EOS included (for throughput figures)
        self.prefill_tokens = 0  # prompt (and earlier) tokens run through a prefill
        self._thread = threading.Thread(target=self._run, name="leantune-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish every request it holds, then end the thread."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._thread.join()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._active)

    def submit(self, *reqs: Request) -> None:
        """Queue requests, all or none (the choices of one API request)."""
        with self._lock:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(self._active) + len(reqs) > self.limits.queue_size:
                raise QueueFull(f"{self.limits.queue_size} requests are already waiting or running (--queue-size)")
            for req in reqs:
                req.number = next(self._numbers)
                self._waiting.append(req)
            self._lock.notify_all()

    def call(self, fn: Callable) -> Future:
        """Run ``fn()`` in the engine's thread between two steps (adapters added or removed at run time)."""
        fut: Future = Future()
        with self._lock:
            self._calls.append((fn, fut))
            self._lock.notify_all()
        return fut

    def uses(self, adapter: str) -> bool:
        with self._lock:
            return any(r.adapter == adapter for r in itertools.chain(self._waiting, self._active))

    # -- the thread ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting or self._active or self._calls or self._stop):
                    self._lock.wait()
                calls = list(self._calls)
                self._calls.clear()
                while self._waiting and len(self._active) < self.limits.max_batch:
                    self._active.append(self._waiting.popleft())
                if self._stop and not (self._active or calls):
                    return
            for fn, fut in calls:
                try:
                    fut.set_result(fn())
                except Exception as e:  # noqa: BLE001  handed to the caller
                    fut.set_exception(e)
            if self._active:
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001  every request of the step is told, the engine goes on
                    with self._lock:
                        failed, self._active = self._active, []
                    for r in failed:
                        r.on_token(None, f"error: {type(e).__name__}: {e}")

    @torch.no_grad()
    def _step(self) -> None:
        now = time.monotonic()
        for r in [r for r in self._active if r.deadline < now]:
            self._finish(r, "timeout")
        known = set(self.bank.names())
        for r in [r for r in self._active if r.adapter is not None and r.adapter not in known]:
            self._finish(r, f"error: adapter {r.adapter!r} was removed while the request waited")
        if not self._active:
            return
        groups = self.bank.groups([r.adapter for r in self._active])
        keys = [self._group_key([self._active[i] for i in g]) for g in groups]
        key = self._next_group(keys)
        rows = [self._active[i] for i in groups[keys.index(key)]]
        self._cohorts = {k: c for k, c in self._cohorts.items() if k in keys}  # groups with no rows left: freed
        rows, logits = self._decode(key, rows)
        nxt = next_tokens(logits[:, -1], rows)
        self.steps += 1
        self.tokens += len(rows)
        asked = [i for i, r in enumerate(rows) if r.logprobs is not None]
        entries = {}
        if asked:
            k = max(rows[i].logprobs for i in asked)
            idx = torch.tensor(asked, device=logits.device)
            entries = dict(zip(asked, token_logprobs(logits[idx, -1], [nxt[i] for i in asked], k), strict=True))
        for i, (r, tok) in enumerate(zip(rows, nxt, strict=True)):
            if self.eos is not None and tok == self.eos:  # the EOS is not part of the answer (nor its logprob)
                self._finish(r, "stop")
                continue
            if i in entries:
                t, lp, alts = entries[i]
                r.token_logprobs.append((t, lp, alts[:r.logprobs]))
            r.tokens.append(tok)
            r.on_token(tok, None)
            if r.stopped():
                self._finish(r, "stop")
            elif len(r.tokens) >= r.max_new_tokens:
                self._finish(r, "length")

    def _next_group(self, keys: list) -> object:
        """The group whose turn it is: the current one for up to ``limits.group_steps`` steps in a row while it has
        rows, then the next in order (a group alone keeps the turn)."""
        if self._turn is not None:
            current, streak = self._turn
            if current in keys and (streak < self.limits.group_steps or len(keys) == 1):
                self._turn = (current, streak + 1)
                return current
            nxt = keys[(keys.index(current) + 1) % len(keys)] if current in keys else keys[0]
        else:
            nxt = keys[0]
        self._turn = (nxt, 1)
        return nxt

    def _group_key(self, rows: list[Request]):
        """The mixed group (None) or the switch-only adapter a group of rows runs on."""
        a = rows[0].adapter
        return a if a is not None and not self.bank.adapters[a].mixed else None

    def _decode(self, key, rows: list[Request]):
        """One step for ``rows`` on the group's KV cache: rows that finished are dropped from it, the rows in it
        decode their last token, and rows that are not in it (joining) are prefilled on their own and appended
        to it (each side left-padded to the wider one). Without a cache (or one whose layers cannot be appended
        to) every row is prefilled and that becomes the group's cache."""
        device = next(self.bank.model.parameters()).device
        co = self._cohorts.get(key)
        if co is None or not _appendable(co.cache):
            self._cohorts[key], logits = self._prefill(rows, device)
            return self._cohorts[key].rows, logits
        present = {id(r) for r in rows}
        keep = [i for i, r in enumerate(co.rows) if id(r) in present]
        if len(keep) < len(co.rows):
            idx = torch.tensor(keep, dtype=torch.long, device=device)
            co.cache.batch_select_indices(idx)
            co.mask = co.mask[idx]
            co.rows = [co.rows[i] for i in keep]
            _trim(co)
        cached = {id(r) for r in co.rows}
        joining = [r for r in rows if id(r) not in cached]
        logits = []
        if co.rows:
            ids = torch.tensor([[r.tokens[-1]] for r in co.rows], device=device)
            co.mask = torch.cat([co.mask, co.mask.new_ones(len(co.rows), 1)], dim=1)
            positions = co.mask.sum(-1, keepdim=True) - 1
            # with rows joining, the terms (no switch in and straight out again for the joiners' prefill)
            with self.bank.using([r.adapter for r in co.rows], switch=not joining):
                out = self.bank.model(input_ids=ids, attention_mask=co.mask, position_ids=positions,
                                      past_key_values=co.cache, use_cache=True, logits_to_keep=1)
            logits.append(out.logits)
        if joining:
            new, out = self._prefill(joining, device)
            logits.append(out)
            if co.rows:
                _append(co, new)
            else:
                self._cohorts[key] = co = new
        return co.rows, torch.cat(logits)

    def _prefill(self, rows: list[Request], device):
        """Every row's whole sequence (prompt + tokens so far), left-padded, positions from the mask; rows of one
        adapter together (the bank reads consecutive slots as views). Returns the rows' cohort and logits."""
        rows = sorted(rows, key=lambda r: self.bank._number(r.adapter))
        ids, mask = left_pad([r.prompt + r.tokens for r in rows], self.pad)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.prefill_tokens += int(mask.sum())
        with self.bank.using([r.adapter for r in rows], switch=False):
            out = self.bank.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                  logits_to_keep=1)
        return _Cohort(rows, out.past_key_values, mask), out.logits

    def _finish(self, r: Request, reason: str) -> None:
        with self._lock:
            self._active.remove(r)
        r.on_token(None, reason)


@torch.no_grad()
def prompt_logprobs(bank: AdapterBank, ids: list[int], adapter: str | None, k: int) -> list[tuple]:
    """Every token of ``ids`` after the first, scored given the ones before it through ``adapter``: (token,
    log-probability, k alternatives) as ``token_logprobs`` gives them (run in the engine's thread: ``Engine.call``)."""
    device = next(bank.model.parameters()).device
    if len(ids) < 2:
        return []
    logits = bank.forward(torch.tensor([ids], device=device), [adapter])[0, :-1]
    return token_logprobs(logits, ids[1:], k)
