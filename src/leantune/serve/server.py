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
from pathlib import Path

from ..data.encode import bos_prefix
from ..data.templates import render_default
from .bank import BASE, AdapterBank, check_name
from .engine import Engine, Limits, QueueFull, Request

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
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string (or a list of one string)")
        return await _serve(body, prompt, chat=False)

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
        return await _serve(body, text, chat=True)

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

    async def _serve(body: dict, text: str, chat: bool):
        adapter = _adapter_of(body.get("model"))
        max_new = body.get("max_tokens", body.get("max_completion_tokens", limits.default_new_tokens))
        if max_new is None:
            max_new = limits.default_new_tokens
        if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= limits.max_new_tokens:
            raise ApiError(400, f"'max_tokens' must be an integer in [1, {limits.max_new_tokens}] "
                                f"(--max-new-tokens), got {max_new!r}")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, f"'stream' must be true or false, got {stream!r}")
        sampling = sampling_params(body)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = bos_prefix(tokenizer, ids) + ids
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this server takes at most "
                                f"{limits.max_prompt_tokens} (--max-prompt-tokens)")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_token(tok, end):  # called from the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, (tok, end))

        stops = sampling["stop"]
        req = Request(ids, adapter, max_new, on_token, time.monotonic() + limits.request_timeout_s, **sampling,
                      decode=lambda toks: tokenizer.decode(toks, skip_special_tokens=True))
        try:
            engine.submit(req)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry shortly", "rate_limit_error",
                           {"Retry-After": "1"}) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        name = body.get("model") or BASE
        if stream:
            return StreamingResponse(_events(events, rid, created, name, chat, stops),
                                     media_type="text/event-stream")
        tokens, reason = [], None
        while reason is None:
            tok, reason = await events.get()
            if tok is not None:
                tokens.append(tok)
        if reason == "timeout":
            raise ApiError(504, f"the request took longer than {limits.request_timeout_s:g} s (--request-timeout)",
                           "timeout_error")
        if reason.startswith("error"):
            raise ApiError(500, f"generation failed: {reason}", "server_error")
        out = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops)
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(tokens), "total_tokens": len(ids) + len(tokens)}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": reason}
            return {"id": rid, "object": "chat.completion", "created": created, "model": name, "choices": [choice],
                    "usage": usage}
        return {"id": rid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": 0, "text": out, "logprobs": None, "finish_reason": reason}], "usage": usage}

    async def _events(events, rid, created, name, chat, stops):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text, reason, first=False):
            if chat:
                delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": name,
                                          "choices": [choice]}) + "\n\n"

        tokens, sent, reason = [], "", None
        hold = max((len(s) for s in stops), default=1) - 1  # what could be the start of a stop string waits
        if chat:
            yield chunk("", None, first=True)
        while reason is None:
            tok, reason = await events.get()
            if tok is not None:
                tokens.append(tok)
                full = tokenizer.decode(tokens, skip_special_tokens=True)
                text = cut_at_stop(full, stops)
                if len(text) == len(full):
                    text = text[:len(text) - hold]
                if not text.endswith("\ufffd") and len(text) > len(sent):  # whole characters only
                    yield chunk(text[len(sent):], None)
                    sent = text
        text = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops)
        if reason in ("stop", "length"):
            yield chunk(text[len(sent):], reason)
        else:
            msg = {"timeout": f"the request took longer than {limits.request_timeout_s:g} s"}.get(reason, reason)
            yield "data: " + json.dumps({"error": {"message": msg, "type": "server_error"}}) + "\n\n"
        yield "data: [DONE]\n\n"

    return app


DEFAULT_TEMPERATURE = 1.0  # OpenAI's: a request without "temperature" is sampled; send 0 for greedy
MAX_STOPS = 4


def sampling_params(body: dict) -> dict:
    """OpenAI's sampling fields of a request, checked: ``temperature`` (0 to 2, default 1; 0 is greedy),
    ``top_p`` (over 0 to 1, default 1), ``seed`` (an integer: the same seed draws the same tokens), ``stop`` (a
    string or up to 4; the text is cut before the first and finishes with "stop"); ``n`` other than 1 is refused.
    Raises :class:`ApiError` (400) naming the field."""

    def number(key, default, ok, what):
        v = body.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise ApiError(400, f"'{key}' must be {what}, got {v!r}")
        return float(v)

    temperature = number("temperature", DEFAULT_TEMPERATURE, lambda v: 0 <= v <= 2, "a number in [0, 2] (0: greedy)")
    top_p = number("top_p", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63):
        raise ApiError(400, f"'seed' must be an integer (64-bit), got {seed!r}")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ApiError(400, f"'n' must be 1: this server returns one choice per request (got {n!r}); send n "
                            "requests instead")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(x, str) and x for x in stops):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them, "
                            f"got {stop!r}")
    return {"temperature": temperature, "top_p": top_p, "seed": seed, "stop": tuple(stops)}


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
