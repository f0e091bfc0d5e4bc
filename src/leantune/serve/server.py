"""An OpenAI-compatible HTTP server over an adapter bank (FastAPI + uvicorn: ``pip install 'leantune[serve]'``).

``GET /v1/models`` (the base as ``base`` and each adapter), ``POST /v1/completions``, ``POST /v1/chat/completions``
(``model`` picks the adapter; ``stream: true`` sends server-sent events), ``GET /health``, and, only when started
with an admin token, ``POST /admin/adapters`` / ``DELETE /admin/adapters/{name}`` (``Authorization: Bearer
TOKEN``). Requests that arrive together decode in one mixed batch (``engine.py``). Errors use OpenAI's shape,
``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..data.encode import bos_prefix
from ..data.templates import render_default
from .bank import BASE, AdapterBank, check_name
from .engine import Engine, Limits, QueueFull, Request, prompt_logprobs

try:
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.responses import JSONResponse, StreamingResponse
except ImportError:  # the CLI says how to install the extra
    FastAPI = None


def require_serve_extra() -> None:
    if FastAPI is None:
        raise ImportError("leantune serve needs FastAPI and uvicorn: pip install 'leantune[serve]' "
                          "(or pip install fastapi uvicorn)")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def create_app(bank: AdapterBank, tokenizer, limits: Limits | None = None, admin_token: str | None = None,
               base_name: str = BASE):
    """The FastAPI app; its lifespan starts the engine and, at shutdown, lets it finish what it holds."""
    require_serve_extra()
    limits = limits or Limits()
    engine = Engine(bank, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                    tokenizer.eos_token_id, limits)
    vocab = vocab_size(bank.model)  # the token ids a prompt or a logit_bias may name (the bank's base is fixed)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="leantune", lifespan=lifespan)
    app.state.engine = engine
    app.state.bank = bank

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}},
                            status_code=exc.status, headers=exc.headers)

    @app.get("/health")
    async def health():
        return {"status": "ok", "adapters": len(bank.names()), "in_flight": engine.in_flight()}

    @app.get("/v1/models")
    async def models():
        ids = [BASE, *bank.names()]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "leantune",
                                            **({"root": base_name} if i == BASE else {"parent": BASE})}
                                           for i in ids]}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await _json(request)
        return await _serve(body, completion_prompts(body.get("prompt"), vocab, limits.max_batch), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await _json(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages):
            raise ApiError(400, "'messages' must be a non-empty list of {\"role\": system|user|assistant, "
                                "\"content\": string}")
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = render_default(msgs)  # leantune's default template, the one training uses (data/templates.py)
        return await _serve(body, [text], chat=True)

    def _check_admin(request: HTTPRequest) -> None:
        if admin_token is None:
            raise ApiError(404, "the admin endpoints are off; start the server with --admin-token-env to use them",
                           "not_found_error")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {admin_token}".encode()):
            raise ApiError(401, "admin endpoints need 'Authorization: Bearer <token>' with the server's admin token",
                           "authentication_error")

    @app.post("/admin/adapters")
    async def add_adapter(request: HTTPRequest):
        _check_admin(request)
        body = await _json(request)
        name, path = body.get("name"), body.get("path")
        try:
            check_name(name)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        if not isinstance(path, str) or not Path(path).is_dir():
            raise ApiError(400, f"'path' must be an adapter folder on the server, got {path!r}")
        if name in bank.names():
            raise ApiError(409, f"adapter {name!r} is already loaded; DELETE it first", "conflict_error")
        try:
            check_base_quantization(bank, name, path)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        try:
            await asyncio.wrap_future(engine.call(lambda: bank.add(name, path)))
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            raise ApiError(400, f"cannot load adapter {name!r}: {e.args[0] if e.args else e}") from None
        return {"id": name, "object": "model", "owned_by": "leantune", "parent": BASE}

    @app.delete("/admin/adapters/{name}")
    async def remove_adapter(name: str, request: HTTPRequest):
        _check_admin(request)
        _adapter_of(name)
        if name == BASE:
            raise ApiError(400, "the base model cannot be removed")
        if engine.uses(name):
            raise ApiError(409, f"adapter {name!r} has requests in flight; try again when they are done",
                           "conflict_error", {"Retry-After": "1"})
        await asyncio.wrap_future(engine.call(lambda: bank.remove(name)))
        return {"id": name, "object": "model", "deleted": True}

    def _adapter_of(model) -> str | None:
        if model is None or model == BASE:
            return None
        if not isinstance(model, str):
            raise ApiError(400, f"'model' must be a string: {BASE!r} or an adapter name")
        try:
            check_name(model)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        if model not in bank.names():
            raise ApiError(404, f"no model {model!r}; served: {', '.join([BASE, *bank.names()])} (GET /v1/models)",
                           "not_found_error")
        return model

    async def _serve(body: dict, prompts: list, chat: bool):
        """``prompts``: texts (tokenized here, BOS first where the tokenizer wants one) or token id lists (as
        given); ``n`` choices of each, choice i of prompt p at index p * n + i."""
        adapter = _adapter_of(body.get("model"))
        refuse_unsupported(body, chat)
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise ApiError(400, f"'echo' must be true or false, got {echo!r}")
        max_new = body.get("max_tokens", body.get("max_completion_tokens", limits.default_new_tokens))
        if max_new is None:
            max_new = limits.default_new_tokens
        low = 0 if echo else 1  # max_tokens 0 with echo: the prompt's log-probabilities only (scoring)
        if isinstance(max_new, bool) or not isinstance(max_new, int) or not low <= max_new <= limits.max_new_tokens:
            raise ApiError(400, f"'max_tokens' must be an integer in [{low}, {limits.max_new_tokens}] "
                                f"(--max-new-tokens; 0 only with echo), got {max_new!r}")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, f"'stream' must be true or false, got {stream!r}")
        n = body.get("n", 1)
        if n is None:
            n = 1
        most = limits.max_batch // len(prompts)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
            raise ApiError(400, f"'n' must be an integer in [1, {most}] ({len(prompts)} prompt(s) x n choices at "
                                f"most --max-batch {limits.max_batch}), got {n!r}")
        sampling = sampling_params(body, vocab)
        k = logprob_count(body, chat)
        items = []
        for prompt in prompts:
            if isinstance(prompt, str):
                ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                bos = bos_prefix(tokenizer, ids)
                item = _Prompt(bos + ids, len(bos), prompt)
            else:  # token ids, taken as they are
                item = _Prompt(list(prompt), 0, tokenizer.decode(prompt, skip_special_tokens=True))
            if len(item.ids) > limits.max_prompt_tokens:
                raise ApiError(400, f"the prompt is {len(item.ids)} tokens; this server takes at most "
                                    f"{limits.max_prompt_tokens} (--max-prompt-tokens)")
            if not echo:
                item.echoed = ""
            elif k is not None:  # every echoed prompt token's log-probability given the ones before it
                scored = await asyncio.wrap_future(engine.call(
                    lambda ids=item.ids: prompt_logprobs(bank, ids, adapter, k)))
                item.entries = [(item.ids[j], None, None) if j == 0 else scored[j - 1]
                                for j in range(item.start, len(item.ids))]
            items.append(item)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stops, seed = sampling.pop("stop"), sampling.pop("seed")
        reqs = []
        for i in range(len(items) * n if max_new else 0):
            def on_token(tok, end, i=i):  # called from the engine's thread
                loop.call_soon_threadsafe(events.put_nowait, (i, tok, end))

            reqs.append(Request(items[i // n].ids, adapter, max_new, on_token,
                                time.monotonic() + limits.request_timeout_s, **sampling, stop=stops,
                                seed=None if seed is None else seed + i % n, logprobs=k,
                                decode=lambda toks: tokenizer.decode(toks, skip_special_tokens=True)))
        try:
            engine.submit(*reqs)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry shortly", "rate_limit_error",
                           {"Retry-After": "1"}) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        name = body.get("model") or BASE
        answer = _Answer(tokenizer, chat, stops, items, n, reqs, k is not None)
        if stream:
            return StreamingResponse(_events(events, answer, rid, created, name), media_type="text/event-stream")
        while not answer.done():
            i, tok, end = await events.get()
            answer.take(i, tok, end)
        reason = answer.failure()
        if reason == "timeout":
            raise ApiError(504, f"the request took longer than {limits.request_timeout_s:g} s (--request-timeout)",
                           "timeout_error")
        if reason is not None:
            raise ApiError(500, f"generation failed: {reason}", "server_error")
        generated, prompt_tokens = sum(len(t) for t in answer.tokens), sum(len(p.ids) for p in items)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                 "total_tokens": prompt_tokens + generated}
        # off the event loop: with logprobs, every token's text offset is a decode of the tokens before it
        choices = await asyncio.to_thread(lambda: [answer.choice(i) for i in range(answer.size)])
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": name, "choices": choices, "usage": usage}

    async def _events(events, answer, rid, created, name):
        obj = "chat.completion.chunk" if answer.chat else "text_completion"

        def chunk(choice):
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": name,
                                          "choices": [choice]}) + "\n\n"

        for i in range(answer.size):
            first = await asyncio.to_thread(answer.first_chunk, i)  # an echoed prompt's offsets: off the event loop
            if first is not None:
                yield chunk(first)
        if not answer.reqs:  # max_tokens 0 (echo): the prompt was all
            for i in range(answer.size):
                yield chunk(answer.last_chunk(i))
        while not answer.done():
            i, tok, end = await events.get()
            answer.take(i, tok, end)
            if end is None:
                part = answer.stream_part(i)
                if part is not None:
                    yield chunk(part)
            elif end in ("stop", "length"):
                yield chunk(answer.last_chunk(i))
            else:
                msg = {"timeout": f"the request took longer than {limits.request_timeout_s:g} s"}.get(end, end)
                yield "data: " + json.dumps({"error": {"message": msg, "type": "server_error"}}) + "\n\n"
                break
        yield "data: [DONE]\n\n"

    return app


@dataclass
class _Prompt:
    ids: list[int]  # what the model reads
    start: int  # where the echoed tokens begin (after a BOS the server put first)
    echoed: str  # the text an echo shows ("" without echo)
    entries: list | None = None  # with echo and logprobs: (token, log-probability, alternatives) per echoed token


class _Answer:
    """The choices of one request as their tokens arrive (``n`` per prompt, choice i of prompt ``i // n``): each
    one's tokens, text (cut at a stop string), finish reason and log-probabilities in OpenAI's shapes (the legacy
    completions' ``tokens / token_logprobs / top_logprobs / text_offset``, or chat's ``content``), whole or as
    stream chunks."""

    def __init__(self, tokenizer, chat: bool, stops, prompts: list[_Prompt], n: int, reqs: list[Request],
                 logprobs: bool):
        self.tokenizer, self.chat, self.stops, self.prompts, self.n = tokenizer, chat, stops, prompts, n
        self.reqs, self.logprobs = reqs, logprobs
        self.size = len(prompts) * n
        self.tokens: list[list[int]] = [[] for _ in range(self.size)]
        self.offsets: list[list[int]] = [[] for _ in range(self.size)]  # where each token's text starts (logprobs)
        self.reasons: list[str | None] = [None if reqs else "length" for _ in range(self.size)]  # none: max_tokens 0
        self.sent = [""] * self.size  # streaming: the text sent so far (the echo aside)
        self.lp_sent = [0] * self.size  # streaming: the tokens whose log-probabilities were sent
        self.hold = max((len(s) for s in stops), default=1) - 1  # what could be the start of a stop string waits

    def echoed(self, i: int) -> str:
        return self.prompts[i // self.n].echoed

    def done(self) -> bool:
        return all(r is not None for r in self.reasons)

    def failure(self) -> str | None:
        return next((r for r in self.reasons if r not in ("stop", "length")), None)

    def decode(self, toks) -> str:
        return self.tokenizer.decode(toks, skip_special_tokens=True)

    def take(self, i: int, tok: int | None, end: str | None) -> None:
        if tok is not None:
            if self.logprobs:
                self.offsets[i].append(len(self.decode(self.tokens[i])))
            self.tokens[i].append(tok)
        if end is not None:
            self.reasons[i] = end

    def final_text(self, i: int) -> str:
        return self.echoed(i) + cut_at_stop(self.decode(self.tokens[i]), self.stops)

    def _kept(self, i: int) -> int:
        """How many generated tokens the answer's text shows: those whose text starts before a stop string's cut."""
        cut = len(cut_at_stop(self.decode(self.tokens[i]), self.stops))
        return sum(1 for o in self.offsets[i] if o < cut) if self.reasons[i] == "stop" and self.stops else \
            len(self.tokens[i])

    def _generated(self, i: int, lo: int, hi: int) -> list:
        """The generated tokens lo..hi of choice i: (token, log-probability, alternatives, offset in the text)."""
        entries = self.reqs[i].token_logprobs if self.reqs else []
        return [(*entries[j], len(self.echoed(i)) + self.offsets[i][j]) for j in range(lo, hi)]

    def _prompt(self, i: int) -> list:
        """The echoed prompt's entries of choice i, with their offsets (none without echo and logprobs)."""
        entries = self.prompts[i // self.n].entries or []
        ids = [e[0] for e in entries]
        return [(*e, len(self.decode(ids[:j]))) for j, e in enumerate(entries)]

    def _format(self, entries: list):
        """OpenAI's logprobs object for (token, log-probability, alternatives, offset) entries."""
        text = lambda t: self.decode([t])  # noqa: E731
        if self.chat:
            return {"content": [{"token": text(t), "logprob": lp, "bytes": None,
                                 "top_logprobs": [{"token": text(a), "logprob": v, "bytes": None} for a, v in alts]}
                                for t, lp, alts, _o in entries]}
        return {"tokens": [text(t) for t, *_ in entries], "token_logprobs": [lp for _t, lp, *_ in entries],
                "top_logprobs": [None if alts is None else _by_text(alts, text) for _t, _lp, alts, _o in entries],
                "text_offset": [o for *_, o in entries]}

    def final_logprobs(self, i: int):
        if not self.logprobs:
            return None
        return self._format(self._prompt(i) + self._generated(i, 0, self._kept(i)))

    def choice(self, i: int) -> dict:
        """Choice i of the whole (non-streamed) answer."""
        text, reason, lp = self.final_text(i), self.reasons[i], self.final_logprobs(i)
        if self.chat:
            return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                    "finish_reason": reason}
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": reason}

    # -- streaming -------------------------------------------------------------------------------------------------
    def first_chunk(self, i: int) -> dict | None:
        """Chat: the role; completions with echo: the prompt (and its log-probabilities); else nothing."""
        if self.chat:
            return {"index": i, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}
        if not self.echoed(i):
            return None
        lp = self._format(self._prompt(i)) if self.logprobs else None
        return {"index": i, "text": self.echoed(i), "logprobs": lp, "finish_reason": None}

    def _part(self, i: int, text: str, reason: str | None, hi: int) -> dict:
        lo, self.lp_sent[i] = self.lp_sent[i], max(self.lp_sent[i], hi)
        lp = self._format(self._generated(i, lo, hi)) if self.logprobs and hi > lo else None
        if self.chat:
            return {"index": i, "delta": {"content": text} if text else {}, "logprobs": lp, "finish_reason": reason}
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": reason}

    def stream_part(self, i: int) -> dict | None:
        """The new whole characters of choice i (none that could begin a stop string), with the log-probabilities
        of the tokens that arrived since its last chunk."""
        full = self.decode(self.tokens[i])
        text = cut_at_stop(full, self.stops)
        if len(text) == len(full):
            text = text[:len(text) - self.hold]
        if text.endswith("\ufffd") or len(text) <= len(self.sent[i]):
            return None
        new, self.sent[i] = text[len(self.sent[i]):], text
        return self._part(i, new, None, len(self.tokens[i]))

    def last_chunk(self, i: int) -> dict:
        text = cut_at_stop(self.decode(self.tokens[i]), self.stops)
        return self._part(i, text[len(self.sent[i]):], self.reasons[i], self._kept(i))


def _by_text(alts, text) -> dict[str, float]:
    """The legacy format's ``{token text: log-probability}``: alternatives whose texts coincide (partial UTF-8 bytes
    all read "\ufffd") keep the likeliest one's value."""
    out: dict[str, float] = {}
    for a, v in alts:
        out.setdefault(text(a), v)
    return out


DEFAULT_TEMPERATURE = 1.0  # OpenAI's: a request without "temperature" is sampled; send 0 for greedy
MAX_STOPS = 4
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's chat top_logprobs limit)
MAX_BIASED = 300  # logit_bias entries (OpenAI's limit)


def sampling_params(body: dict, vocab: int | None = None) -> dict:
    """OpenAI's sampling fields of a request, checked: ``temperature`` (0 to 2, default 1; 0 is greedy),
    ``top_p`` (over 0 to 1, default 1), ``seed`` (an integer: the same seed draws the same tokens; choice i of
    ``n`` draws with seed + i), ``stop`` (a string or up to 4; the text is cut before the first and finishes with
    "stop"), ``presence_penalty`` and ``frequency_penalty`` (-2 to 2, default 0), ``logit_bias`` (token id -> -100
    to 100, ids below the model's ``vocab``). Raises :class:`ApiError` (400) naming the field."""

    def number(key, default, ok, what):
        v = body.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise ApiError(400, f"'{key}' must be {what}, got {v!r}")
        return float(v)

    temperature = number("temperature", DEFAULT_TEMPERATURE, lambda v: 0 <= v <= 2, "a number in [0, 2] (0: greedy)")
    top_p = number("top_p", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    presence = number("presence_penalty", 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
    frequency = number("frequency_penalty", 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63):
        raise ApiError(400, f"'seed' must be an integer (64-bit), got {seed!r}")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(x, str) and x for x in stops):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them, "
                            f"got {stop!r}")
    return {"temperature": temperature, "top_p": top_p, "seed": seed, "stop": tuple(stops),
            "presence_penalty": presence, "frequency_penalty": frequency,
            "logit_bias": logit_bias(body.get("logit_bias"), vocab)}


def logit_bias(value, vocab: int | None) -> dict[int, float] | None:
    """``logit_bias`` as OpenAI sends it (a JSON object: token id as a string -> a number in [-100, 100]), checked."""
    if value is None:
        return None
    what = "an object of token id -> number in [-100, 100]"
    if not isinstance(value, dict) or len(value) > MAX_BIASED:
        raise ApiError(400, f"'logit_bias' must be {what}, at most {MAX_BIASED} entries, got {value!r:.200}")
    out = {}
    for key, v in value.items():
        ok_key = isinstance(key, str) and key.isascii() and key.isdigit()
        tok = int(key) if ok_key else -1
        if not ok_key or (vocab is not None and tok >= vocab):
            raise ApiError(400, f"'logit_bias': {key!r} is not a token id of this model "
                                f"(0 to {vocab - 1 if vocab else '...'})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise ApiError(400, f"'logit_bias' must be {what}; token {key} has {v!r}")
        out[tok] = float(v)
    return out or None


def logprob_count(body: dict, chat: bool) -> int | None:
    """How many alternatives each token's log-probability comes with, or None when none is asked: completions'
    ``logprobs`` (an integer 0 to 20), chat's ``logprobs: true`` with ``top_logprobs`` (0 to 20, default 0)."""
    lp = body.get("logprobs")
    if chat:
        top = body.get("top_logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise ApiError(400, f"'logprobs' must be true or false in a chat request, got {lp!r}")
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS):
            raise ApiError(400, f"'top_logprobs' must be an integer in [0, {MAX_LOGPROBS}], got {top!r}")
        if top is not None and not lp:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true")
        return (top or 0) if lp else None
    if lp is None:
        return None
    if isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS:
        raise ApiError(400, f"'logprobs' must be an integer in [0, {MAX_LOGPROBS}] (alternatives per token), "
                            f"got {lp!r}")
    return lp


def completion_prompts(prompt, vocab: int | None, most: int) -> list:
    """A completions request's ``prompt`` as OpenAI takes it — a string, a list of token ids, or a list of either —
    as a list of prompts (strings or token id lists), checked (ids below ``vocab``; at most ``most`` prompts)."""
    def tokens(v) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(prompt, str) or tokens(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or tokens(p) for p in prompt):
        prompts = prompt
    else:
        raise ApiError(400, "'prompt' must be a string, a list of token ids, or a non-empty list of either")
    if len(prompts) > most:
        raise ApiError(400, f"'prompt' holds {len(prompts)} prompts; this server takes at most {most} per request "
                            "(--max-batch)")
    for p in prompts:
        bad = [t for t in p if not 0 <= t < (vocab or 2**63)] if not isinstance(p, str) else []
        if bad:
            raise ApiError(400, f"'prompt' has token id {bad[0]}, not a token of this model (0 to {vocab - 1})")
    return prompts


def refuse_unsupported(body: dict, chat: bool) -> None:
    """Fields of OpenAI's API that would change the answer and that this server does not implement: a 400 naming
    the field, rather than an answer that silently ignores it."""
    if chat and body.get("echo"):
        raise ApiError(400, "'echo' is a completions field; a chat request cannot echo its messages")
    best_of, n = body.get("best_of"), body.get("n", 1)
    if best_of is not None and best_of != (n or 1):
        raise ApiError(400, f"'best_of' is not supported (got {best_of!r}): ask for n choices and rank them with "
                            "logprobs")
    for key in ("suffix", "tools", "functions", "tool_choice", "function_call"):
        if body.get(key):
            raise ApiError(400, f"'{key}' is not supported by this server; send the request without it")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise ApiError(400, f"'response_format' {fmt!r} is not supported: only {{\"type\": \"text\"}}")


def vocab_size(model) -> int | None:
    """The number of token ids the model scores (its output embedding's rows), None when it cannot be told."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(getattr(head, "out_features", None), int):  # nn.Linear and the quantized linears alike
        return head.out_features
    return getattr(getattr(model, "config", None), "vocab_size", None)


def cut_at_stop(text: str, stops) -> str:
    """``text`` up to (not including) the earliest stop string in it."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(ends)] if ends else text


async def _json(request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_adapters(pairs: list[str]) -> dict[str, str]:
    """``["NAME=PATH", ...]`` -> ``{name: path}``: names checked (never paths), each path an existing folder."""
    out: dict[str, str] = {}
    for item in pairs:
        if "=" not in item:
            raise ValueError(f"--adapter {item!r} must look like NAME=PATH (e.g. --adapter support=runs/support)")
        name, path = item.split("=", 1)
        check_name(name)
        if name in out:
            raise ValueError(f"--adapter: the name {name!r} is given twice")
        if not Path(path).is_dir():
            raise ValueError(f"--adapter {name}: {path!r} is not an adapter folder")
        out[name] = path
    return out


def recorded_quantization(adapters: dict[str, str]) -> dict | None:
    """How the adapters' base was quantized, from their leantune.json (None: full precision); PEFT folders record
    nothing and do not count. Adapters that disagree are refused, naming them: a bank has one base."""
    from ..interop.peft import is_peft_folder
    from ..io import read_meta

    seen: dict[str, list[str]] = {}
    values: dict[str, dict | None] = {}
    for name, path in adapters.items():
        if is_peft_folder(path):
            continue
        q = (read_meta(path).get("base") or {}).get("quantization")
        key = json.dumps(q, sort_keys=True)
        seen.setdefault(key, []).append(name)
        values[key] = q
    if len(seen) > 1:
        kinds = "; ".join(f"{', '.join(names)}: {values[k]['type'] if values[k] else 'full precision'}"
                          + (f" {values[k]}" if values[k] else "") for k, names in seen.items())
        raise ValueError(f"the adapters were trained on bases quantized differently ({kinds}); a server has one "
                         "base: serve them separately, or choose with --quantize nf4|fp4|int8|none")
    return next(iter(values.values()), None)


def check_base_quantization(bank: AdapterBank, name: str, path: str) -> None:
    """An adapter loaded at run time must have been trained on a base quantized the way the server's is (its
    leantune.json says; PEFT folders record nothing): it would load (the fingerprint is the full-precision
    weights') but answer unlike ``leantune generate`` with it. At start ``--quantize`` chooses for every adapter;
    at run time the base is fixed, so a mismatch is refused, naming both."""
    from ..interop.peft import is_peft_folder
    from ..quant import quantization_of

    q = quantization_of(bank.model)
    have = q.to_dict() if q is not None else None
    want = recorded_quantization({name: path})
    if not is_peft_folder(path) and json.dumps(want, sort_keys=True) != json.dumps(have, sort_keys=True):
        def say(d):
            return f"{d['type']} {d}" if d else "full precision"

        raise ValueError(f"adapter {name!r} was trained on a base in {say(want)}; this server's base is in "
                         f"{say(have)}: serve it from a server started on that base (leantune serve --quantize ...)")


def load_bank(model_name: str, adapters: dict[str, str], base_dtype: str | None = None, quantize=None):
    """The base (eval mode) in a bank with every adapter added: ``(bank, tokenizer)``. ``quantize``: None loads
    the base quantized the way the adapters were trained (their leantune.json says; they must agree), ``"none"``
    in full precision, ``"nf4"``/``"fp4"``/``"int8"`` (or a mapping of options) that way."""
    from ..models import load_model

    if quantize is None:
        quantize = recorded_quantization(adapters)
    model, tokenizer = load_model(model_name, dtype=base_dtype, quantize=quantize)
    bank = AdapterBank(model.eval())
    for name, path in adapters.items():
        bank.add(name, path)
    return bank, tokenizer


def run(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until SIGINT / SIGTERM; then stop taking requests and finish the ones in flight."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            print(f"leantune serve: shutting down, finishing {app.state.engine.in_flight()} in-flight request(s)",
                  flush=True)
            super().handle_exit(sig, frame)

    _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)).run()
