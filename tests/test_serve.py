"""The OpenAI-compatible server on loopback: answers equal `leantune generate`, 200 concurrent requests across 8
adapters each get their own adapter's output, bad requests get clear 4xx, shutdown finishes what is in flight."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import leantune  # noqa: E402
from conftest import perturbed_adapter  # noqa: E402
from leantune.data.evaluate import greedy_generate  # noqa: E402
from leantune.serve.engine import Engine, Limits, QueueFull, Request  # noqa: E402
from leantune.serve.server import create_app, load_bank  # noqa: E402

MODEL = "builtin:tiny-llama"
ADAPTERS = {  # 8 adapters of every bank method, one served through the switch only (KronA)
    "l4": ("lora", {"r": 4}), "l8.rs": ("lora", {"r": 8, "rslora": True}), "krona": ("krona", {}),
    "s2ft_a": ("s2ft", {"budget": "count", "heads": 1, "channels": 6, "seed": 1}),
    "s2ft_b": ("s2ft", {"budget": "count", "heads": 2, "channels": 3, "seed": 2, "targets": "o,down,v,up"}),
    "ia3": ("ia3", {}), "bitfit": ("bitfit", {}), "dora": ("lora", {"r": 4, "dora": True}),
}
PROMPTS = ["The cat", "hello", "1 + 1 =", "Once upon a time"]
TOKENS = 4
TOKEN = "s3cret"


def make_adapter(folder, method, noise_seed, **opts):
    return str(perturbed_adapter(folder, leantune.load_model(MODEL)[0], method, noise_seed, 0.5, **opts))


class Live:
    """A uvicorn server in a thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def call(port, method, path, body=None, headers=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read().decode()
    conn.close()
    return resp.status, dict(resp.getheaders()), payload


def complete(port, model, prompt, stream=False, chat=False, max_tokens=TOKENS, **sampling):
    """The answer's text (greedy unless ``sampling`` says otherwise: OpenAI's default temperature is 1)."""
    body = {"model": model, "max_tokens": max_tokens, "stream": stream, "temperature": 0, **sampling}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    status, _h, payload = call(port, "POST", "/v1/chat/completions" if chat else "/v1/completions", body)
    assert status == 200, payload
    if not stream:
        choice = json.loads(payload)["choices"][0]
        return choice["message"]["content"] if chat else choice["text"]
    events = [line[6:] for line in payload.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all("choices" in json.loads(e) for e in events[:-1]), payload
    parts = [json.loads(e)["choices"][0] for e in events[:-1]]
    return "".join(p["delta"].get("content", "") if chat else p["text"] for p in parts)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    folders = {n: make_adapter(root / n, m, i, **o) for i, (n, (m, o)) in enumerate(ADAPTERS.items())}
    bank, tok = load_bank(MODEL, folders)
    live = Live(create_app(bank, tok, Limits(max_prompt_tokens=64, max_new_tokens=32), admin_token=TOKEN))
    yield live, folders, tok
    live.stop()


def expected(folder, prompts, chat=False):
    """What `leantune generate` computes (pipeline.load_for_inference + greedy_generate) for these prompts."""
    from leantune.data.templates import render_default
    from leantune.pipeline import load_for_inference

    model, tok = load_for_inference(MODEL, folder)
    texts = [render_default([{"role": "user", "content": p}]) if chat else p for p in prompts]
    return [greedy_generate(model, tok, [t], TOKENS)[0] for t in texts]


def test_models_lists_the_base_and_every_adapter(served):
    live, folders, _ = served
    status, _h, payload = call(live.port, "GET", "/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(payload)["data"]] == ["base", *folders]
    status, _h, payload = call(live.port, "GET", "/health")
    assert status == 200 and json.loads(payload)["status"] == "ok"


def test_generation_equals_leantune_generate(served, tmp_path):
    live, folders, _ = served
    from typer.testing import CliRunner

    from leantune.cli import app

    result = CliRunner().invoke(app, ["generate", "--model", MODEL, "--adapter", folders["s2ft_b"], "-p", PROMPTS[0],
                                      "--max-new-tokens", str(TOKENS)])
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n") == PROMPTS[0] + complete(live.port, "s2ft_b", PROMPTS[0])
    for name in ("krona", "dora"):
        assert complete(live.port, name, PROMPTS[1], stream=True) == expected(folders[name], PROMPTS[1:2])[0]
    assert complete(live.port, "base", PROMPTS[2]) == expected(None, PROMPTS[2:3])[0]
    assert complete(live.port, "ia3", PROMPTS[3], chat=True) == expected(folders["ia3"], PROMPTS[3:], chat=True)[0]


def test_200_concurrent_requests_across_8_adapters_each_get_their_own_output(served):
    live, folders, _ = served
    want = {n: dict(zip(PROMPTS, expected(f, PROMPTS), strict=True)) for n, f in folders.items()}
    assert len({tuple(v.values()) for v in want.values()}) == len(folders)  # the adapters answer differently
    # a third streaming; a quarter stop after 2 tokens, so rows leave the batch (and its KV cache) mid-decode
    jobs = [(list(folders)[i % 8], PROMPTS[(i // 8) % 4], i % 3 == 0, 2 if i % 4 == 1 else TOKENS) for i in range(200)]
    with ThreadPoolExecutor(max_workers=200) as pool:
        got = list(pool.map(lambda j: complete(live.port, j[0], j[1], stream=j[2], max_tokens=j[3]), jobs))
    assert len(got) == 200
    wrong = [(j, g) for j, g in zip(jobs, got, strict=True)
             if not (g == want[j[0]][j[1]] if j[3] == TOKENS else want[j[0]][j[1]].startswith(g.rstrip("\ufffd")))]
    assert not wrong, wrong[:3]


def test_a_joining_request_prefills_only_itself_and_every_row_keeps_its_output(served):
    """Requests join a decoding batch with longer and shorter sequences than its cache (either side left-padded),
    one leaves early: every answer equals its adapter's greedy output alone, and no row is prefilled twice."""
    from concurrent.futures import Future

    from leantune.data.encode import bos_prefix
    from leantune.pipeline import load_for_inference

    _live, folders, _ = served
    bank, tok = load_bank(MODEL, {n: folders[n] for n in ("l4", "s2ft_a", "ia3")})
    engine = Engine(bank, tok.pad_token_id, tok.eos_token_id)
    jobs = {"a": ("l4", "Once upon a time", 3), "b": ("s2ft_a", "The cat sat on the mat and then it", 6),
            "c": ("ia3", "hi", 6), "d": (None, "1 + 1 =", 5)}
    joins = {("a", 1): "bc", ("b", 2): "d"}  # when a has 1 token, b and c join; when b has 2, d joins
    done, reqs = {k: Future() for k in jobs}, {}

    def submit(k):
        adapter, prompt, n = jobs[k]
        ids = tok(prompt, add_special_tokens=False)["input_ids"]

        def on_token(t, end, k=k):
            if end is not None:
                done[k].set_result((reqs[k].tokens, end))
            for j in joins.get((k, len(reqs[k].tokens)), "") if t is not None else "":
                submit(j)

        reqs[k] = Request(bos_prefix(tok, ids) + ids, adapter, n, on_token, time.monotonic() + 120)
        engine.submit(reqs[k])

    submit("a")
    engine.start()
    try:
        got = {k: f.result(timeout=120) for k, f in done.items()}
    finally:
        engine.stop()
    for k, (adapter, prompt, n) in jobs.items():
        model, t = load_for_inference(MODEL, folders[adapter] if adapter else None)
        want = greedy_generate(model, t, [prompt], n)[0]
        assert tok.decode(got[k][0], skip_special_tokens=True) == want, (k, got[k])
    assert engine.prefill_tokens == sum(len(r.prompt) for r in reqs.values())  # each prompt prefilled once


def test_appending_and_trimming_a_cohort_keep_every_rows_attended_keys():
    from transformers.cache_utils import DynamicCache

    from leantune.serve.engine import _append, _Cohort, _trim

    def cohort(lengths, width, tag):
        cache = DynamicCache()
        k = torch.randn(len(lengths), 2, width, 3)
        mask = torch.stack([(torch.arange(width) >= width - n).long() for n in lengths])
        cache.update(k, k + 1, 0)
        return _Cohort([f"{tag}{i}" for i in range(len(lengths))], cache, mask)

    def attended(co):  # row -> the keys its mask attends to
        keys = co.cache.layers[0].keys
        return {r: keys[i][:, co.mask[i].bool()] for i, r in enumerate(co.rows)}

    a, b = cohort([5, 2], 5, "a"), cohort([7, 3], 7, "b")
    want = {**attended(a), **attended(b)}
    _append(a, b)  # the narrower side (a) left-padded to 7
    assert a.mask.shape == (4, 7) and a.rows == ["a0", "a1", "b0", "b1"]
    got = attended(a)
    assert all(torch.equal(got[r], want[r]) for r in want)
    a.cache.batch_select_indices(torch.tensor([1, 3]))
    a.mask, a.rows = a.mask[[1, 3]], [a.rows[1], a.rows[3]]
    _trim(a)  # rows of 2 and 3 positions left: 4 leading positions no row attends to
    assert a.mask.shape == (2, 3) and a.cache.layers[0].keys.shape[2] == 3
    got = attended(a)
    assert all(torch.equal(got[r], want[r]) for r in a.rows)


def test_bad_requests_get_clear_4xx(served):
    live, _folders, _ = served
    status, _h, p = call(live.port, "POST", "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and "no model 'nope'" in json.loads(p)["error"]["message"]
    status, _h, p = call(live.port, "POST", "/v1/completions", raw=b'{"model": "l4", "prompt": ')
    assert status == 400 and "not valid JSON" in json.loads(p)["error"]["message"]
    status, _h, p = call(live.port, "POST", "/v1/completions", {"model": "l4", "prompt": "x" * 200})
    assert status == 400 and "at most 64" in json.loads(p)["error"]["message"]
    status, _h, p = call(live.port, "POST", "/v1/completions", {"model": "../../etc/passwd", "prompt": "x"})
    assert status == 400 and "never a path" in json.loads(p)["error"]["message"]
    status, _h, p = call(live.port, "POST", "/v1/completions", {"model": "l4", "prompt": "x", "max_tokens": 999})
    assert status == 400 and "max_tokens" in json.loads(p)["error"]["message"]
    status, _h, p = call(live.port, "POST", "/v1/chat/completions", {"model": "l4", "messages": "hi"})
    assert status == 400 and "messages" in json.loads(p)["error"]["message"]


def test_admin_needs_its_token_and_loads_at_run_time(served, tmp_path):
    live, folders, _ = served
    body = {"name": "late", "path": folders["l4"]}
    status, _h, _p = call(live.port, "POST", "/admin/adapters", body)
    assert status == 401
    status, _h, _p = call(live.port, "POST", "/admin/adapters", body, {"Authorization": "Bearer wrong"})
    assert status == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, _h, p = call(live.port, "POST", "/admin/adapters", {"name": "../x", "path": folders["l4"]}, auth)
    assert status == 400 and "never a path" in p
    status, _h, p = call(live.port, "POST", "/admin/adapters", body, auth)
    assert status == 200, p
    assert complete(live.port, "late", PROMPTS[0]) == complete(live.port, "l4", PROMPTS[0])
    status, _h, _p = call(live.port, "DELETE", "/admin/adapters/late", headers=auth)
    assert status == 200
    assert call(live.port, "POST", "/v1/completions", {"model": "late", "prompt": "x"})[0] == 404


def test_admin_is_off_by_default(tmp_path):
    bank, tok = load_bank(MODEL, {})
    live = Live(create_app(bank, tok))
    try:
        status, _h, p = call(live.port, "POST", "/admin/adapters", {"name": "a", "path": str(tmp_path)},
                             {"Authorization": "Bearer anything"})
        assert status == 404 and "off" in p
    finally:
        live.stop()


def test_a_full_queue_refuses_with_429_semantics():
    bank, tok = load_bank(MODEL, {})
    engine = Engine(bank, 0, 2, Limits(queue_size=2))  # not started: requests stay queued
    for _ in range(2):
        engine.submit(Request([1, 5], None, 4, lambda *a: None, time.monotonic() + 60))
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        engine.submit(Request([1, 5], None, 4, lambda *a: None, time.monotonic() + 60))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shutdown_finishes_requests_in_flight(served):
    _live, folders, _ = served
    port = free_port()
    env = {**os.environ, "LEANTUNE_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "leantune.cli", "serve", "--model", MODEL, "--adapter",
                             f"a={folders['l4']}", "--port", str(port), "--max-new-tokens", "200"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if call(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(call, port, "POST", "/v1/completions",
                                   {"model": "a", "prompt": f"request {i}", "max_tokens": 200}) for i in range(4)]
            while json.loads(call(port, "GET", "/health")[2])["in_flight"] == 0:
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=120) for f in futures]
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    n = int(out.split("finishing ")[1].split(" in-flight")[0])
    assert n > 0, out  # the signal came while requests were running ...
    for status, _h, payload in results:  # ... and every one of them was answered in full
        assert status == 200, payload
        body = json.loads(payload)
        assert body["choices"][0]["finish_reason"] in ("length", "stop")
        assert body["usage"]["completion_tokens"] == 200 or body["choices"][0]["finish_reason"] == "stop"


def test_temperature_0_is_greedy_a_seed_repeats_and_another_seed_differs(served):
    live, folders, _ = served
    greedy = expected(folders["l4"], PROMPTS[:1])[0]
    assert complete(live.port, "l4", PROMPTS[0]) == greedy  # temperature 0 (what complete() sends by default)
    draws = {seed: [complete(live.port, "l4", PROMPTS[0], max_tokens=12, temperature=1.5, seed=seed, stream=stream)
                    for stream in (False, True)] for seed in (1, 2)}
    assert draws[1][0] == draws[1][1] and draws[2][0] == draws[2][1]  # a seed draws the same tokens, streamed or not
    assert draws[1][0] != draws[2][0]  # ... and another seed others
    assert complete(live.port, "l4", PROMPTS[0], temperature=1.5, seed=1, top_p=1e-9) == greedy  # nucleus of one


def test_a_tiny_top_p_keeps_only_the_most_likely_token():
    from leantune.serve.engine import next_tokens

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    rows = [Request([1], None, 4, lambda *a: None, 0.0, temperature=t, top_p=p, seed=7)
            for t, p in ((0.0, 1.0), (2.0, 1e-6), (2.0, 1.0))]
    got = next_tokens(logits, rows)
    assert got[:2] == logits[:2].argmax(-1).tolist()
    draws = [next_tokens(logits[2:], [Request([1], None, 4, lambda *a: None, 0.0, temperature=1.0, seed=s)])[0]
             for s in range(200)]
    freq = torch.bincount(torch.tensor(draws), minlength=50).double() / 200
    torch.testing.assert_close(freq, torch.softmax(logits[2].double(), -1), atol=0.08, rtol=0)


def test_stop_strings_cut_the_text_and_finish_with_stop(served):
    live, _folders, _ = served
    full = complete(live.port, "l8.rs", PROMPTS[3], max_tokens=12)
    stop = full[5:7]
    want = full[:full.find(stop)]
    for stream in (False, True):
        body = {"model": "l8.rs", "prompt": PROMPTS[3], "max_tokens": 12, "temperature": 0, "stop": [stop, "\x00zz"],
                "stream": stream}
        status, _h, payload = call(live.port, "POST", "/v1/completions", body)
        assert status == 200, payload
        if stream:
            parts = [json.loads(e[6:])["choices"][0] for e in payload.split("\n") if e.startswith("data: {")]
            text, reason = "".join(p["text"] for p in parts), parts[-1]["finish_reason"]
        else:
            choice = json.loads(payload)["choices"][0]
            text, reason = choice["text"], choice["finish_reason"]
        assert (text, reason) == (want, "stop"), stream


@pytest.mark.parametrize("field,value", [("temperature", -0.5), ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5),
                                         ("seed", 1.5), ("seed", True), ("stop", ""), ("stop", ["a"] * 5),
                                         ("stop", 3), ("n", 0), ("n", 1000), ("presence_penalty", 2.5),
                                         ("frequency_penalty", "x"), ("logit_bias", {"abc": 1}),
                                         ("logit_bias", {"259": 1}), ("logit_bias", {"5": 101}), ("logit_bias", [1]),
                                         ("logprobs", 21), ("logprobs", True), ("best_of", 3), ("suffix", "!"),
                                         ("response_format", {"type": "json_object"}), ("tools", [{"type": "x"}]),
                                         ("max_tokens", 0), ("echo", "yes")])
def test_bad_sampling_values_get_400_naming_the_field(served, field, value):
    live, _folders, _ = served
    status, _h, p = call(live.port, "POST", "/v1/completions", {"model": "l4", "prompt": "x", field: value})
    assert status == 400 and f"'{field}'" in json.loads(p)["error"]["message"], p


def test_serve_refuses_an_encoder_decoder_base_at_start(monkeypatch):
    from typer.testing import CliRunner

    import leantune.serve.server as server
    from leantune.cli import app

    monkeypatch.setattr(server, "run", lambda *a, **k: pytest.fail("the server started on an encoder-decoder"))

    result = CliRunner().invoke(app, ["serve", "--model", "builtin:tiny-t5", "--port", str(free_port())])
    assert result.exit_code != 0 and "encoder-decoder" in result.output and "decoder-only" in result.output, \
        result.output
    bank, tok = load_bank("builtin:tiny-t5", {})
    with pytest.raises(ValueError, match="encoder-decoder"):
        bank.generate([[1, 5]], [None], 2, pad_token_id=0)


# -- sampling adjustments, log-probabilities, n choices, echo ----------------------------------------------------


def reference(folder, prompt, n, presence=0.0, frequency=0.0, bias=None, chat=False):
    """Greedy tokens and every step's log-softmax, from the plain adapted model (``load_for_inference``) without a
    KV cache, OpenAI's penalties (over the generated tokens) and logit bias applied by hand."""
    from leantune.data.encode import bos_prefix
    from leantune.data.templates import render_default
    from leantune.pipeline import load_for_inference

    model, tok = load_for_inference(MODEL, folder)
    text = render_default([{"role": "user", "content": prompt}]) if chat else prompt
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = bos_prefix(tok, ids) + ids
    out, lps = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1].double()
            adj = logits.clone()
            for t, b in (bias or {}).items():
                adj[t] += b
            for t in set(out):
                adj[t] -= presence + frequency * out.count(t)
            nxt = int(adj.argmax())
            if nxt == tok.eos_token_id:
                break
            lps.append(torch.log_softmax(logits, -1))
            out.append(nxt)
    return out, lps, tok


def test_penalties_and_bias_adjust_the_logits_over_generated_tokens_only():
    from leantune.serve.engine import adjusted_logits

    logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(3))
    r = Request([9, 9, 4], None, 8, lambda *a: None, 0.0, presence_penalty=0.5, frequency_penalty=0.25,
                logit_bias={7: 2.0, 3: -1.0})
    r.tokens = [3, 3, 5]
    plain = Request([9], None, 8, lambda *a: None, 0.0)
    plain.tokens = [3]
    got = adjusted_logits(logits, [r, plain])
    want = logits[0].clone()
    want[7] += 2.0
    want[3] += -1.0 - 0.5 - 0.25 * 2  # biased, generated twice
    want[5] -= 0.5 + 0.25  # generated once; 9 and 4 only in the prompt: not penalized
    torch.testing.assert_close(got[0], want)
    torch.testing.assert_close(got[1], logits[1])  # a row that asks for nothing keeps its logits


def test_penalties_and_bias_through_the_server_equal_a_reference(served):
    live, folders, _ = served
    want, _lps, tok = reference(folders["l4"], PROMPTS[3], 8, presence=1.5, frequency=0.7)
    got = complete(live.port, "l4", PROMPTS[3], max_tokens=8, presence_penalty=1.5, frequency_penalty=0.7)
    assert got == tok.decode(want, skip_special_tokens=True)
    assert got != complete(live.port, "l4", PROMPTS[3], max_tokens=8)  # the penalties changed the answer
    z = tok("z", add_special_tokens=False)["input_ids"][0]
    assert complete(live.port, "s2ft_a", PROMPTS[0], max_tokens=5, logit_bias={str(z): 100}) == "zzzzz"


def test_logprobs_equal_the_models_log_softmax_streamed_or_not(served):
    live, folders, _ = served
    want, lps, tok = reference(folders["l8.rs"], PROMPTS[2], 6)
    body = {"model": "l8.rs", "prompt": PROMPTS[2], "max_tokens": 6, "temperature": 0, "logprobs": 3}
    status, _h, payload = call(live.port, "POST", "/v1/completions", body)
    assert status == 200, payload
    choice = json.loads(payload)["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == tok.decode(want, skip_special_tokens=True)
    assert lp["tokens"] == [tok.decode([t], skip_special_tokens=True) for t in want]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"], dtype=torch.float64),
                               torch.stack([lps[i][t] for i, t in enumerate(want)]), atol=1e-4, rtol=0)
    for i, top in enumerate(lp["top_logprobs"]):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(float(lps[i].max()), abs=1e-4)  # greedy: the top
    assert lp["text_offset"] == [len(tok.decode(want[:i], skip_special_tokens=True)) for i in range(len(want))]
    status, _h, payload = call(live.port, "POST", "/v1/completions", {**body, "stream": True})
    parts = [json.loads(e[6:])["choices"][0] for e in payload.split("\n") if e.startswith("data: {")]
    streamed = [x for p in parts if p["logprobs"] for x in p["logprobs"]["token_logprobs"]]
    assert streamed == lp["token_logprobs"]
    # chat: logprobs true, top_logprobs 2
    want, lps, _tok = reference(folders["ia3"], PROMPTS[0], 4, chat=True)
    body = {"model": "ia3", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 4, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    status, _h, payload = call(live.port, "POST", "/v1/chat/completions", body)
    content = json.loads(payload)["choices"][0]["logprobs"]["content"]
    assert [len(c["top_logprobs"]) for c in content] == [2] * len(want)
    torch.testing.assert_close(torch.tensor([c["logprob"] for c in content], dtype=torch.float64),
                               torch.stack([lps[i][t] for i, t in enumerate(want)]), atol=1e-4, rtol=0)


def test_echo_with_max_tokens_0_scores_the_prompt(served):
    from leantune.pipeline import load_for_inference

    live, folders, tok = served
    prompt = PROMPTS[3]
    body = {"model": "s2ft_b", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    status, _h, payload = call(live.port, "POST", "/v1/completions", body)
    assert status == 200, payload
    choice = json.loads(payload)["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    model, _t = load_for_inference(MODEL, folders["s2ft_b"])
    with torch.no_grad():
        lsm = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    want = torch.stack([lsm[j - 1, ids[j]] for j in range(1, len(ids))])  # each prompt token given the ones before
    got = choice["logprobs"]["token_logprobs"]
    assert len(got) == len(ids) - 1  # the BOS the server put first is not echoed
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, atol=1e-4, rtol=0)
    # echo with tokens to generate: the prompt, then the answer
    body = {"model": "s2ft_b", "prompt": prompt, "max_tokens": TOKENS, "echo": True, "temperature": 0}
    status, _h, payload = call(live.port, "POST", "/v1/completions", body)
    assert json.loads(payload)["choices"][0]["text"] == prompt + expected(folders["s2ft_b"], [prompt])[0]


def test_n_choices_each_draw_with_seed_plus_index_streamed_or_not(served):
    live, _folders, _ = served
    body = {"model": "l4", "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 1.3, "seed": 40}
    singles = [json.loads(call(live.port, "POST", "/v1/completions", {**body, "seed": 40 + i})[2]) for i in range(3)]
    one = [a["choices"][0]["text"] for a in singles]
    status, _h, payload = call(live.port, "POST", "/v1/completions", {**body, "n": 3})
    assert status == 200, payload
    answer = json.loads(payload)
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    assert [c["text"] for c in answer["choices"]] == one
    assert len(set(one)) > 1  # the choices differ
    assert answer["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in singles)
    assert answer["usage"]["prompt_tokens"] == singles[0]["usage"]["prompt_tokens"]
    status, _h, payload = call(live.port, "POST", "/v1/chat/completions",
                               {**{k: v for k, v in body.items() if k != "prompt"}, "n": 3, "stream": True,
                                "messages": [{"role": "user", "content": PROMPTS[1]}]})
    parts = [json.loads(e[6:])["choices"][0] for e in payload.split("\n") if e.startswith("data: {")]
    texts = {i: "".join(p["delta"].get("content", "") for p in parts if p["index"] == i) for i in range(3)}
    finished = [p["index"] for p in parts if p["finish_reason"]]
    assert sorted(finished) == [0, 1, 2]
    chat_one = [complete(live.port, "l4", PROMPTS[1], chat=True, max_tokens=8, temperature=1.3, seed=40 + i)
                for i in range(3)]
    assert [texts[i] for i in range(3)] == chat_one


def test_several_prompts_and_token_id_prompts_each_answer_as_alone(served):
    live, folders, tok = served
    ids = [tok.bos_token_id] + tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    body = {"model": "l4", "max_tokens": TOKENS, "temperature": 0}
    status, _h, payload = call(live.port, "POST", "/v1/completions", {**body, "prompt": [PROMPTS[2], ids], "n": 2})
    assert status == 200, payload
    choices = json.loads(payload)["choices"]
    want = expected(folders["l4"], [PROMPTS[2], PROMPTS[0]])
    assert [(c["index"], c["text"]) for c in choices] == [(0, want[0]), (1, want[0]), (2, want[1]), (3, want[1])]
    # a token id prompt is read as given (here: with the BOS the server would have put first), echoed decoded
    # and scored from its second token on
    status, _h, payload = call(live.port, "POST", "/v1/completions",
                               {**body, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0})
    choice = json.loads(payload)["choices"][0]
    assert choice["text"] == tok.decode(ids, skip_special_tokens=True)
    lp = choice["logprobs"]["token_logprobs"]
    assert len(lp) == len(ids) and lp[0] is None and all(isinstance(v, float) for v in lp[1:])
    for bad in ([ids, 3], [[5, 9999]], [], [[]]):
        status, _h, payload = call(live.port, "POST", "/v1/completions", {**body, "prompt": bad})
        assert status == 400 and "'prompt'" in json.loads(payload)["error"]["message"], payload


@pytest.mark.parametrize("path,body,field", [
    ("/v1/chat/completions", {"echo": True}, "echo"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": 3}, "logprobs")])
def test_chat_only_fields_are_checked(served, path, body, field):
    live, _folders, _ = served
    body = {"model": "l4", "messages": [{"role": "user", "content": "x"}], **body}
    status, _h, p = call(live.port, "POST", path, body)
    assert status == 400 and f"'{field}'" in json.loads(p)["error"]["message"], p


def test_the_official_openai_client_reads_every_answer_shape(served):
    """OpenAI's own Python client (its typed responses and its server-sent-events reader) against the server:
    completions with logprobs and n, echo scoring, chat streamed with logprobs, the model list and an error."""
    openai = pytest.importorskip("openai")
    live, folders, _tok = served
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{live.port}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["base", *folders]
    out = client.completions.create(model="l4", prompt=PROMPTS[2], max_tokens=TOKENS, temperature=0, logprobs=2, n=2)
    assert [c.text for c in out.choices] == [expected(folders["l4"], PROMPTS[2:3])[0]] * 2
    assert len(out.choices[0].logprobs.token_logprobs) == out.usage.completion_tokens // 2
    scored = client.completions.create(model="l4", prompt=PROMPTS[2], max_tokens=0, echo=True, logprobs=0,
                                       temperature=0)
    assert scored.choices[0].text == PROMPTS[2] and scored.choices[0].logprobs.token_logprobs[0] is not None
    stream = client.chat.completions.create(model="ia3", messages=[{"role": "user", "content": PROMPTS[3]}],
                                            max_tokens=TOKENS, temperature=0, stream=True, logprobs=True,
                                            top_logprobs=1)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == expected(folders["ia3"], PROMPTS[3:], chat=True)[0]
    scored_tokens = sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices[0].logprobs)
    assert (chunks[-1].choices[0].finish_reason, scored_tokens) == ("length", TOKENS)
    with pytest.raises(openai.NotFoundError, match="no model"):
        client.completions.create(model="nope", prompt="x", max_tokens=1)


def test_a_group_keeps_its_turn_for_group_steps_so_switch_only_adapters_switch_once_per_turn(served):
    """A switch-only adapter (KronA) decoding beside a mixed-batch one: with turns of 4 steps the bank switches at
    most half as often as with turns of one step, and every answer is still its adapter's greedy output alone."""
    _live, folders, _ = served
    want = {n: expected(folders[n], PROMPTS[:2]) for n in ("krona", "l4")}
    counts = {}
    for steps in (1, 4):
        bank, tok = load_bank(MODEL, {n: folders[n] for n in ("krona", "l4")})
        switches = []
        plain_switch = bank.switch

        def counting(name, plain_switch=plain_switch, bank=bank, switches=switches):
            if name != bank.current:
                switches.append(name)
            plain_switch(name)

        bank.switch = counting
        engine = Engine(bank, tok.pad_token_id, tok.eos_token_id, Limits(group_steps=steps))
        done = {}
        reqs = []
        for adapter in ("krona", "l4"):
            for prompt in PROMPTS[:2]:
                ids = tok(prompt, add_special_tokens=False)["input_ids"]
                key = (adapter, prompt)
                done[key] = threading.Event()
                reqs.append((key, Request([tok.bos_token_id, *ids], adapter, TOKENS,
                                          lambda t, end, ev=done[key]: end is not None and ev.set(),
                                          time.monotonic() + 120)))
        engine.submit(*[r for _k, r in reqs])
        engine.start()
        try:
            assert all(e.wait(120) for e in done.values())
        finally:
            engine.stop()
        for (adapter, prompt), r in reqs:
            assert tok.decode(r.tokens, skip_special_tokens=True) == want[adapter][PROMPTS.index(prompt)], steps
        counts[steps] = len(switches)
    assert 0 < 2 * counts[4] <= counts[1], counts
