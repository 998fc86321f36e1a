"""slm serve through the real ``openai`` client, against servers this file starts on 127.0.0.1.

Two servers: the tiny trained run (context 32, no chat template: completions, scoring, errors,
concurrency) and a random model with the chat tokens (context 1024, an API key, a batch of 2 and a
queue of 1: chat, streaming, cancellation, overload, a kill). Both run the engine in its own
process (the default); the thread engine is served in-process through Starlette's TestClient.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch

from slmkit.checkpoint import load_run
from slmkit.errors import SlmError
from slmkit.serve.metrics import parse

KEY = "sk-test"
LONG = 2000  # tokens of a request that runs for a while (a second or more) on the chat server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(run: Path, log: Path, *flags: str):
    """``slm serve RUN`` in a subprocess; yields (base url, process) once /health says ok."""
    port = free_port()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "slmkit.cli", "serve", str(run), "--port", str(port),
                                 "--threads", "1", *flags], stdout=err, stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def plain_server(run_dir, tmp_path_factory):
    with server(run_dir, tmp_path_factory.mktemp("log") / "plain.log") as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def plain(plain_server):
    return plain_server[0]


@pytest.fixture(scope="module")
def chat_run(run_dir, tmp_path_factory):
    """A run whose tokenizer carries the chat template: a random model, context 2048, big enough that
    a long request runs for a while (with the C++ decoder a 4 x 256 model ran 1,000 tokens in a
    fraction of a second, and a request could end before the playground's Stop reached it)."""
    from slmkit.chat import add_chat_tokens
    from slmkit.model import GPT, ModelConfig
    from slmkit.rundir import create_run
    from slmkit.trainer import TrainConfig

    _, tok, _ = load_run(run_dir)
    tok = add_chat_tokens(tok)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=2048, n_layer=8, n_head=6, n_embd=384)).eval()
    return create_run(tmp_path_factory.mktemp("chat") / "run", model, tok, TrainConfig())


@pytest.fixture(scope="module")
def chatty(chat_run, tmp_path_factory):
    with server(chat_run, tmp_path_factory.mktemp("log") / "chat.log", "--api-key", KEY, "--max-batch", "2",
                "--max-queue", "1") as (url, proc):
        yield url, proc


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def metrics(url: str) -> dict[str, float]:
    return parse(httpx.get(f"{url}/metrics").text)


def children(pid: int) -> dict[int, str]:
    """The processes whose parent is ``pid``: their names (``/proc/PID/comm``)."""
    out = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out[int(entry.name)] = (entry / "comm").read_text().strip()
        except (OSError, ValueError, IndexError):
            pass
    return out


def alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def engine_pid(server_pid: int) -> int:
    """The engine's process of the server ``server_pid`` (its main thread calls itself slm-engine)."""
    [pid] = [pid for pid, name in children(server_pid).items() if name == "slm-engine"]
    return pid


# --- completions ----------------------------------------------------------------------------------


def test_completion_is_the_librarys_greedy_text_in_every_prompt_form(plain, run_dir):
    from slmkit.generate import SamplingConfig, generate

    model, tok, _ = load_run(run_dir)
    expected = generate(model, tok, ["Once upon a time", "Tom"], SamplingConfig(temperature=0.0, max_new_tokens=10))
    c = client(plain)
    one = c.completions.create(model="m", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert one.choices[0].text == expected[0] and one.object == "text_completion"
    assert one.usage.prompt_tokens == len(tok.encode("Once upon a time"))
    assert one.usage.completion_tokens == len(tok.encode(expected[0])) or one.choices[0].finish_reason == "stop"
    both = c.completions.create(model="m", prompt=["Once upon a time", "Tom"], max_tokens=10, temperature=0)
    assert [ch.text for ch in both.choices] == expected
    ids = c.completions.create(model="m", prompt=tok.encode("Tom"), max_tokens=10, temperature=0)
    lists = c.completions.create(model="m", prompt=[tok.encode("Tom")], max_tokens=10, temperature=0)
    assert ids.choices[0].text == lists.choices[0].text == expected[1]


def test_streaming_gives_the_same_text_with_usage_and_done(plain):
    c = client(plain)
    whole = c.completions.create(model="m", prompt="Once upon a time", max_tokens=12, temperature=0)
    chunks = list(c.completions.create(model="m", prompt="Once upon a time", max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    with httpx.stream("POST", f"{plain}/v1/completions", json={"prompt": "Tom", "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"


def test_n_and_seed_reproduce_samples(plain):
    c = client(plain)
    ask = dict(model="m", prompt="Once upon a time", max_tokens=12, temperature=1.0, n=3, seed=11)
    first, again = c.completions.create(**ask), c.completions.create(**ask)
    texts = [ch.text for ch in first.choices]
    assert [ch.index for ch in first.choices] == [0, 1, 2]
    assert texts == [ch.text for ch in again.choices]
    assert len(set(texts)) > 1  # each choice its own stream
    other = c.completions.create(**{**ask, "seed": 12})
    assert [ch.text for ch in other.choices] != texts


def test_stop_strings_end_the_text_before_them(plain):
    c = client(plain)
    full = c.completions.create(model="m", prompt="Once upon a time", max_tokens=20, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = c.completions.create(model="m", prompt="Once upon a time", max_tokens=20, temperature=0, stop=[stop, "zzz"],
                               extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_echo_logprobs_score_a_text_as_slm_eval_does(plain, run_dir, tmp_path):
    from slmkit.evaluate import evaluate_run

    _, tok, _ = load_run(run_dir)
    story = "Once upon a time, Tom had a cat. Tom liked the cat very much. One day Lily came to play."
    # one window of slm eval (context 32): 33 tokens, the text and <|endoftext|>
    text = next(story[:i] for i in range(len(story)) if len(tok.encode(story[:i])) == 32 and story[i - 1] != " ")
    (tmp_path / "doc.txt").write_text(text)
    loss = evaluate_run(run_dir, input_path=str(tmp_path / "doc.txt"))["loss"]
    ids = tok.encode(text) + [tok.eot_id]
    scored = client(plain).completions.create(model="m", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    lps = scored.choices[0].logprobs.token_logprobs
    assert lps[0] is None and len(lps) == len(ids) and scored.usage.completion_tokens == 0
    assert -sum(lps[1:]) / (len(ids) - 1) == pytest.approx(loss, abs=1e-5)
    assert scored.choices[0].text == tok.decode(ids)
    assert all(len(top) == 1 for top in scored.choices[0].logprobs.top_logprobs[1:])


def test_sampling_extras_are_applied(plain, run_dir):
    _, tok, _ = load_run(run_dir)
    c = client(plain)
    base = dict(model="m", prompt="Once upon a time", max_tokens=6, temperature=0)
    greedy = c.completions.create(**base).choices[0]
    first = tok.encode(greedy.text)[0]
    banned = c.completions.create(**base, logit_bias={str(first): -100}).choices[0]
    assert tok.encode(banned.text)[:1] != [first]
    forced = c.completions.create(**base, logit_bias={"7": 100}).choices[0]
    assert tok.encode(forced.text) == [7] * 6
    assert len(c.completions.create(**base, extra_body={"min_tokens": 6}).choices[0].text) > 0
    for extra in ({"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "temperature": 0.7},
                  {"presence_penalty": 1.0, "frequency_penalty": 0.5}):
        assert c.completions.create(**{**base, "seed": 1}, extra_body=extra).choices[0].finish_reason


def test_logprobs_of_generated_tokens(plain):
    out = client(plain).completions.create(model="m", prompt="Tom", max_tokens=5, temperature=0, logprobs=3,
                                           extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5 and all(len(t) <= 3 for t in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(abs(v - max(t.values())) < 1e-6 for v, t in zip(lp.token_logprobs, lp.top_logprobs))


def test_concurrent_greedy_requests_equal_their_solo_output_and_finish_sooner(plain):
    c = client(plain)
    prompts = ["Once upon a time", "Tom", "Lily had a", "One day", "The cat", "Ben was", "They played", "Mia"]
    ask = dict(model="m", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    for p in prompts[:2]:  # warm up
        c.completions.create(prompt=p, **ask)
    # "Sooner" in passes of the model, which is what decoding costs: this tiny model's steps take
    # microseconds, so wall time here would measure HTTP, not batching (bench/serve.py times a real one).
    steps0 = metrics(plain)["slm_engine_steps_total"]
    solo = [c.completions.create(prompt=p, **ask).choices[0].text for p in prompts]
    steps1 = metrics(plain)["slm_engine_steps_total"]
    start = threading.Barrier(len(prompts), timeout=60)  # the requests sent as nearly at once as their threads can

    def ask_together(p: str) -> str:
        start.wait()
        return c.completions.create(prompt=p, **ask).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask_together, prompts))
    steps2 = metrics(plain)["slm_engine_steps_total"]
    assert together == solo
    sequential, concurrent = steps1 - steps0, steps2 - steps1
    # One request at a time needs a pass per token each; served together they share passes. How many
    # depends on how the requests' arrivals overlap (this tiny model's passes take microseconds, so
    # the HTTP side's pace sets it): sent from threads as they started, 170 of 208 once with the cores
    # busy with other work; sent together, 27-78 of 208 busy or idle.
    assert sequential >= 8 * 24 and concurrent <= 0.8 * sequential, (concurrent, sequential)


# --- errors ---------------------------------------------------------------------------------------


def test_errors_have_openais_shape_and_status(plain):
    c = client(plain)
    r = httpx.post(f"{plain}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="m", prompt="Tom", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="context of 32 tokens"):
        c.completions.create(model="m", prompt="Tom " * 40)
    with pytest.raises(openai.BadRequestError, match="lower max_tokens"):
        c.completions.create(model="m", prompt="Tom", max_tokens=100)
    with pytest.raises(openai.BadRequestError, match="at most 4"):
        c.completions.create(model="m", prompt="Tom", stop=["a", "b", "c", "d", "e"])
    with pytest.raises(openai.BadRequestError, match="no chat template.*fine-tune"):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    big = httpx.post(f"{plain}/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert big.status_code == 413 and "limit" in big.json()["error"]["message"]
    assert httpx.get(f"{plain}/v1/nothing").status_code == 404


def test_models_health_tokenize_and_metrics(plain, run_dir):
    _, tok, _ = load_run(run_dir)
    card = client(plain).models.list().data[0]
    assert card.context_length == 32 and card.parameters > 0
    assert httpx.get(f"{plain}/health").json() == {"status": "ok"}
    ids = httpx.post(f"{plain}/tokenize", json={"prompt": "Tom had a cat"}).json()["tokens"]
    assert ids == tok.encode("Tom had a cat")
    assert httpx.post(f"{plain}/detokenize", json={"tokens": ids}).json()["prompt"] == "Tom had a cat"
    m = metrics(plain)
    assert m['slm_requests_total{endpoint="completions",status="200"}'] >= 1
    assert m["slm_generation_tokens_total"] > 0 and m["slm_time_to_first_token_seconds_count"] > 0


def test_the_engine_counters_come_from_the_engines_process_exact_at_the_scrape(plain_server):
    url, proc = plain_server
    child = engine_pid(proc.pid)  # the engine runs there: the server's own threads have no engine among them
    assert alive(child) and "slm-engine" not in {p.read_text().strip() for p in Path(f"/proc/{proc.pid}/task").glob("*/comm")}
    before = metrics(url)
    done = client(url).completions.create(model="m", prompt="Tom had", max_tokens=5, temperature=0)
    after = metrics(url)  # asked of the engine's process at the scrape: already counts the request just answered
    assert after["slm_generation_tokens_total"] - before["slm_generation_tokens_total"] == done.usage.completion_tokens
    assert after["slm_prompt_tokens_total"] - before["slm_prompt_tokens_total"] == done.usage.prompt_tokens
    assert after["slm_time_to_first_token_seconds_count"] == before["slm_time_to_first_token_seconds_count"] + 1
    assert after["slm_engine_steps_total"] >= before["slm_engine_steps_total"] + done.usage.completion_tokens


def test_the_thread_engine_serves_the_same_text_in_process(plain, run_dir):
    """``--engine thread``: the same Engine loop on a thread of the app's process (here under
    Starlette's TestClient) gives the process engine's greedy text and logprobs."""
    from starlette.testclient import TestClient

    from slmkit.serve.app import create_app
    from slmkit.serve.cli import make_engine
    from slmkit.serve.config import ServeConfig

    body = {"prompt": ["Tom had a", "Once"], "max_tokens": 8, "temperature": 0, "logprobs": 2, "stop": ["."]}
    want = httpx.post(f"{plain}/v1/completions", json=body).json()["choices"]
    engine = make_engine(ServeConfig(threads=1), lambda: load_run(run_dir)[:2])
    engine.start()
    try:
        with TestClient(create_app(engine, ServeConfig(), "m")) as http:
            assert engine.loaded.wait(30) and http.get("/health").json() == {"status": "ok"}
            got = http.post("/v1/completions", json=body).json()["choices"]
            assert parse(http.get("/metrics").text)["slm_generation_tokens_total"] > 0
    finally:
        engine.stop()
    assert [c["text"] for c in got] == [c["text"] for c in want] and got[0]["text"]
    assert [c["finish_reason"] for c in got] == [c["finish_reason"] for c in want]
    for g, w in zip(got, want):
        assert g["logprobs"]["tokens"] == w["logprobs"]["tokens"]
        assert g["logprobs"]["token_logprobs"] == pytest.approx(w["logprobs"]["token_logprobs"], abs=1e-5)


def test_a_stream_interval_sends_tokens_in_groups_with_the_same_text_and_stops(plain, run_dir):
    """``--stream-interval 3``: a stream's first token comes alone, then events of 3 tokens (the
    last one with what is left), with the text, logprobs and usage of ``--stream-interval 1``; a
    stop string still ends its row at the same token (the text is made every step)."""
    from starlette.testclient import TestClient

    from slmkit.serve.app import create_app
    from slmkit.serve.cli import make_engine
    from slmkit.serve.config import ServeConfig

    body = {"prompt": "Once upon a time", "max_tokens": 11, "temperature": 0, "logprobs": 1, "ignore_eos": True,
            "stream": True}
    full = httpx.post(f"{plain}/v1/completions", json={**body, "stream": False}).json()["choices"][0]
    stop = full["text"][len(full["text"]) // 2 : len(full["text"]) // 2 + 3]
    cut = httpx.post(f"{plain}/v1/completions", json={**body, "stream": False, "stop": [stop]}).json()
    with pytest.raises(SlmError, match="--stream-interval"):
        ServeConfig(stream_interval=0).validate()
    engine = make_engine(ServeConfig(threads=1, stream_interval=3), lambda: load_run(run_dir)[:2])
    events = []  # each step's events, as the engine hands them over (the HTTP side may merge them)
    hand_over = engine._hand_over
    engine._hand_over = lambda pairs: (events.extend((e.start, e.end) for _, e in pairs), hand_over(pairs))
    engine.start()
    try:
        with TestClient(create_app(engine, ServeConfig(), "m")) as http:
            assert engine.loaded.wait(30)
            with http.stream("POST", "/v1/completions", json=body) as r:
                chunks = [json.loads(line[5:]) for line in r.iter_lines()
                          if line.startswith("data:") and line != "data: [DONE]"]
            grouped = [(start, end) for start, end in events if end > start]
            stopped = http.post("/v1/completions", json={**body, "stream": False, "stop": [stop]}).json()
    finally:
        engine.stop()
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert grouped == [(0, 1), (1, 4), (4, 7), (7, 10), (10, 11)]
    assert "".join(c["text"] for c in choices) == full["text"] and choices[-1]["finish_reason"] == "length"
    assert [t for c in choices if c["logprobs"] for t in c["logprobs"]["tokens"]] == full["logprobs"]["tokens"]
    assert stopped["choices"][0]["text"] == cut["choices"][0]["text"] == full["text"][: full["text"].index(stop)]
    assert stopped["usage"] == cut["usage"] and stopped["choices"][0]["finish_reason"] == "stop"


def test_prompts_that_share_an_opening_hit_the_prefix_cache(plain):
    c = client(plain)
    ask = dict(model="m", max_tokens=4, temperature=0)
    before = metrics(plain)
    c.completions.create(prompt="Pam had a red hat", **ask)
    after_one = metrics(plain)
    c.completions.create(prompt="Pam had a red dog", **ask)
    after_two = metrics(plain)
    hits = [m["slm_prefix_cache_hits_total"] - before["slm_prefix_cache_hits_total"] for m in (after_one, after_two)]
    looked_up = after_two["slm_prefix_cache_queries_total"] - before["slm_prefix_cache_queries_total"]
    assert hits[0] == 0 < hits[1] and looked_up == after_two["slm_prompt_tokens_total"] - before["slm_prompt_tokens_total"]
    assert after_two["slm_prefix_cache_bytes"] > 0


def test_prefix_cache_mb_sizes_the_engines_cache_and_0_turns_it_off():
    from generation_models import random_model

    from slmkit.errors import SlmError
    from slmkit.serve.cli import make_engine
    from slmkit.serve.config import ServeConfig

    on = make_engine(ServeConfig(), lambda: None)
    assert on.prefixes is not None and on.prefixes.budget == ServeConfig().prefix_cache_mb << 20 > 0
    off = make_engine(ServeConfig(prefix_cache_mb=0), lambda: None)
    off.model = on.model = random_model()
    assert off.prefixes is None and off.new_batch().prefixes is None and on.new_batch().prefixes is on.prefixes
    assert "slm_prefix_cache_hits_total 0" in off.metrics.render()
    with pytest.raises(SlmError, match="--prefix-cache-mb must be >= 0"):
        ServeConfig(prefix_cache_mb=-1).validate()


def test_health_is_503_while_loading():
    from starlette.testclient import TestClient

    from slmkit.serve.app import create_app
    from slmkit.serve.config import ServeConfig
    from slmkit.serve.engine import Engine

    go = threading.Event()
    engine = Engine(lambda: (go.wait(), (_ for _ in ()).throw(RuntimeError("no model")))[1],
                    max_batch=1, max_queue=1, prefill_chunk=8)
    engine.start()
    with TestClient(create_app(engine, ServeConfig(), "m")) as http:
        assert http.get("/health").status_code == 503
        assert http.post("/v1/completions", json={"prompt": "x"}).status_code == 503
        go.set()
        engine.loaded.wait(5)
        assert http.get("/health").json() == {"status": "failed", "error": "no model"}


# --- the chat server --------------------------------------------------------------------------------


def test_chat_sync_and_stream(chatty):
    url, _ = chatty
    c = client(url, KEY)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    out = c.chat.completions.create(model="m", messages=messages, max_completion_tokens=8, temperature=0,
                                    logprobs=True, top_logprobs=2)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.content) == out.usage.completion_tokens
    chunks = list(c.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == choice.message.content
    assert [ch for ch in chunks if ch.choices][-1].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].usage.total_tokens == out.usage.total_tokens
    rendered = httpx.post(f"{url}/tokenize", json={"messages": messages},
                          headers={"authorization": f"Bearer {KEY}"}).json()
    assert rendered["count"] == out.usage.prompt_tokens


def test_wrong_key_is_401(chatty):
    url, _ = chatty
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").models.list()
    assert httpx.get(f"{url}/health").status_code == 200  # health and metrics stay open


def long_stream(url: str, started: threading.Event, stop: threading.Event, killed: bool = False) -> None:
    """Read a long stream until ``stop`` is set (or, ``killed``, until the server dies)."""
    try:
        _long_stream(url, started, stop)
    except httpx.HTTPError:
        if not killed:
            raise


def _long_stream(url: str, started: threading.Event, stop: threading.Event) -> None:
    body = {"prompt": "Once", "max_tokens": LONG, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}"},
                      timeout=30) as r:
        for _ in r.iter_lines():
            started.set()
            if stop.is_set():
                return


def wait_for(url: str, check, what: str, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if check(m):
            return m
        assert time.monotonic() < deadline, f"{what}: {m}"
        time.sleep(0.02)


def test_a_full_queue_answers_429_and_gone_clients_free_their_slots(chatty):
    url, _ = chatty
    stop = threading.Event()
    threads = []
    for i in range(3):  # two run (--max-batch 2), one waits (--max-queue 1)
        started = threading.Event()
        t = threading.Thread(target=long_stream, args=(url, started, stop))
        t.start()
        threads.append(t)
        if i < 2:
            assert started.wait(10)
    wait_for(url, lambda m: m["slm_batch_size"] == 2 and m["slm_queue_depth"] == 1, "two running, one queued")
    with pytest.raises(openai.RateLimitError) as e:
        client(url, KEY).completions.create(model="m", prompt="Tom", max_tokens=5)
    assert e.value.response.headers["retry-after"] == "1"
    before = metrics(url)
    stop.set()  # the clients hang up mid-stream
    for t in threads:
        t.join(10)
    after = wait_for(url, lambda m: m["slm_batch_size"] == 0 and m["slm_requests_running"] == 0, "slots freed")
    assert after["slm_requests_cancelled_total"] >= before["slm_requests_cancelled_total"] + 3
    assert after["slm_generation_tokens_total"] - before["slm_generation_tokens_total"] < 3 * LONG


def test_a_non_streaming_client_that_leaves_is_cancelled(chatty):
    url, _ = chatty
    before = metrics(url)
    body = {"prompt": "Once", "max_tokens": LONG, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=0.3)
    after = wait_for(url, lambda m: m["slm_requests_cancelled_total"] > before["slm_requests_cancelled_total"]
                     and m["slm_batch_size"] == 0, "the request cancelled")
    assert after["slm_generation_tokens_total"] - before["slm_generation_tokens_total"] < LONG


def digest(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file()}


def test_killing_the_server_loses_nothing_on_disk_and_leaves_no_process_behind(chat_run, tmp_path):
    before = digest(chat_run)
    with server(chat_run, tmp_path / "kill.log") as (url, proc):
        started, stop = threading.Event(), threading.Event()
        t = threading.Thread(target=long_stream, args=(url, started, stop, True), daemon=True)
        t.start()
        started.wait(10)
        left = children(proc.pid)
        assert "slm-engine" in left.values()  # mid-stream: the engine's process is stepping
        proc.kill()  # no chance to stop the engine: it sees the end of its pipe and exits
        proc.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in left):
            assert time.monotonic() < deadline, f"still running after the server was killed: {left}"
            time.sleep(0.05)
    assert digest(chat_run) == before


def test_if_the_engines_process_dies_requests_in_flight_fail_and_health_says_so(chat_run, tmp_path):
    with server(chat_run, tmp_path / "die.log") as (url, proc):
        auth = {"authorization": f"Bearer {KEY}"}
        body = {"prompt": "Once", "max_tokens": LONG, "ignore_eos": True}
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, f"{url}/v1/completions", json=body, headers=auth, timeout=30)
            wait_for(url, lambda m: m["slm_batch_size"] == 1, "the request running")
            os.kill(engine_pid(proc.pid), 9)
            failed = answer.result()
        assert failed.status_code == 500, failed.text
        error = failed.json()["error"]
        assert error["type"] == "server_error" and "engine process ended unexpectedly (exit code -9)" in error["message"]
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "exit code -9" in health.json()["error"]
        again = httpx.post(f"{url}/v1/completions", json=body, headers=auth)
        assert again.status_code == 503 and "engine process ended" in again.json()["error"]["message"]
        assert proc.poll() is None  # the server stays up to say what happened


def test_bad_flags_and_runs_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "slmkit.cli", "serve", str(tmp_path), "--port", "1"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().startswith("error:") and "RUN_DIR" in out.stderr
    out = subprocess.run([sys.executable, "-m", "slmkit.cli", "serve", str(tmp_path), "--max-batch", "0"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--max-batch" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    (tmp_path / "config.toml").write_text("[model]\n")  # looks like a run, has no checkpoint
    out = subprocess.run([sys.executable, "-m", "slmkit.cli", "serve", str(tmp_path), "--port", str(free_port())],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: cannot load"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# --- the playground, in a real headless browser -------------------------------------------------


def chromium_path() -> str:
    """Debian's chromium (``apt-get install chromium``; .ci/run installs it), or skip saying so."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra has it)")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed: apt-get install -y chromium (.ci/run does)")
    return path


def test_playground_streams_and_stop_cancels_on_the_server(chatty, tmp_path):
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    url, _ = chatty
    before = metrics(url)
    text = "document.getElementById('output').textContent"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(url)
        page.fill("#api_key", KEY)
        page.dispatch_event("#api_key", "change")
        page.wait_for_function("document.getElementById('model').textContent.includes('parameters')")
        # a long completion, streamed; Stop cancels it on the server
        page.click("#mode-completion")
        page.fill("#max_tokens", str(LONG))
        page.fill("#temperature", "0")
        page.check("#ignore_eos")
        page.fill("#prompt", "Once upon a time")
        page.click("#send")
        page.wait_for_function(f"{text}.length > 'Once upon a time'.length + 5")
        page.click("#stop")
        wait_for(url, lambda m: m["slm_batch_size"] == 0
                 and m["slm_requests_cancelled_total"] > before["slm_requests_cancelled_total"], "Stop cancelled")
        after = metrics(url)
        assert after["slm_generation_tokens_total"] - before["slm_generation_tokens_total"] < LONG
        shown = page.evaluate(text)
        time.sleep(0.2)
        assert page.evaluate(text) == shown  # nothing more arrives
        assert "tokens/s" in page.text_content("#stats") and "stopped" in page.text_content("#stats")
        assert page.text_content("#rendered").startswith("4 tokens") or "tokens:" in page.text_content("#rendered")
        # chat: the reply streams into the history, the rendered prompt shows the template
        page.click("#mode-chat")
        page.fill("#max_tokens", "6")
        page.fill("#prompt", "Hello there")
        page.click("#send")
        page.wait_for_function("document.getElementById('stats').textContent.includes('(')")
        assert page.locator("#history .msg.user").inner_text().endswith("Hello there")
        assert page.locator("#history .msg.assistant").count() == 1
        page.wait_for_function("document.getElementById('rendered').textContent.includes('<|assistant|>')")
        # history survives a reload (localStorage)
        page.reload()
        page.wait_for_selector("#history .msg.assistant")
        assert "Hello there" in page.text_content("#history")
        page.screenshot(path=str(tmp_path / "playground.png"))
        browser.close()


def test_a_streamed_text_chunk_is_the_json_sse_starlette_would_write():
    import json

    from sse_starlette.event import ensure_bytes

    from slmkit.serve.app import sse_prefix, sse_text_chunk

    top = {"id": "cmpl-1", "object": "text_completion", "created": 17, "model": "m\u00e9"}
    for index, text, reason in [(0, " once", None), (3, 'a "b"\n\\ \u00e9\U0001f600', None), (12, "", "length")]:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
        expected = ensure_bytes({"data": json.dumps({**top, "choices": [choice]})}, "\r\n")
        assert sse_text_chunk(sse_prefix(top), index, text, reason) == expected


def test_event_stream_sends_without_a_cancel_scope_unless_a_send_timeout_is_set(monkeypatch):
    import asyncio

    import anyio

    from sse_starlette.sse import EventSourceResponse

    from slmkit.serve.app import EventStream

    if not hasattr(EventSourceResponse, "_send_with_timeout"):
        pytest.skip("this sse-starlette sends without _send_with_timeout: EventStream is its plain response")
    scopes = []
    move_on_after = anyio.move_on_after
    monkeypatch.setattr(anyio, "move_on_after", lambda *a, **k: scopes.append(a) or move_on_after(*a, **k))
    sent = []

    async def send(message):
        sent.append(message)

    async def body():
        yield b"data: 1\r\n\r\n"

    message = {"type": "http.response.body", "body": b"x", "more_body": True}
    asyncio.run(EventStream(body())._send_with_timeout(send, message))
    assert sent == [message] and scopes == []  # no timeout: sent as it is, no scope
    asyncio.run(EventStream(body(), send_timeout=5)._send_with_timeout(send, message))
    assert sent == [message, message] and scopes == [(5,)]  # a timeout: sse-starlette's own path

    async def broken(message):
        raise ConnectionResetError

    stream = EventStream(body())
    with pytest.raises(ConnectionResetError):
        asyncio.run(stream._send_with_timeout(broken, message))
    assert stream._send_interrupted  # as sse-starlette marks a failed send


def test_kv_cache_setting_reaches_the_batch_or_falls_back_with_a_warning(monkeypatch, caplog):
    """--kv-cache bf16 (the default) gives the engine's batch bf16 KV caches where the C++ step runs;
    fp32 the model's dtype; a decoder that reads only its model's dtype keeps that, with a warning."""
    from generation_models import random_model

    from slmkit import cpu_kernels
    from slmkit.decode.native import NativeDecoder
    from slmkit.serve.config import ServeConfig
    from slmkit.serve.engine import Engine

    if cpu_kernels.built() is not None:
        pytest.skip(f"no C++ library: {cpu_kernels.built()}")
    assert ServeConfig().kv_cache == "bf16"
    engine = Engine(lambda: None, max_batch=2, max_queue=1, prefill_chunk=8, kv_cache="bf16")
    engine.model = random_model()
    batch = engine.new_batch()
    assert batch.kv_dtype == torch.bfloat16
    assert batch.decoder.rest and not NativeDecoder(engine.model).rest  # the server's steps let the pool sleep
    engine.kv_cache = "fp32"
    assert engine.new_batch().kv_dtype == torch.float32
    engine.kv_cache = "bf16"
    monkeypatch.setattr(NativeDecoder, "kv_dtypes", ())
    with caplog.at_level("WARNING", logger="slmkit.serve"):
        assert engine.new_batch().kv_dtype == torch.float32
    assert "--kv-cache bf16 is off" in caplog.text


def test_weights_setting_gives_the_tokens_of_its_decoder_or_falls_back_with_a_warning(monkeypatch, caplog):
    """--weights bf16 (the default) decodes the run's float32 matrices rounded to bf16, with bf16
    products where the CPU has them: the engine's batch gives the greedy tokens and log-probabilities
    of that NativeDecoder; fp32 those of the float32 one. Where the C++ step cannot run the model,
    the batch's own decoder, after one warning. A bad value is one line naming the flag."""
    from generation_models import random_model

    from slmkit import cpu_kernels
    from slmkit.decode import KVCache
    from slmkit.decode.native import NativeDecoder, bf16_arithmetic
    from slmkit.errors import SlmError
    from slmkit.generate.continuous import Seq
    from slmkit.generate.sampling import SamplingConfig
    from slmkit.serve.cli import make_engine
    from slmkit.serve.config import ServeConfig

    with pytest.raises(SlmError, match="--weights must be fp32 or bf16, got 'fp16'"):
        ServeConfig(weights="fp16").validate()
    if cpu_kernels.built() is not None:
        pytest.skip(f"no C++ library: {cpu_kernels.built()}")
    assert ServeConfig().weights == "bf16"
    model = random_model(block_size=48)
    prompts, n = [[1, 2, 3], [5] * 9, [7, 8, 9, 10, 11]], 30

    def alone(decoder: NativeDecoder) -> tuple[list[list[int]], list[float]]:
        """Greedy tokens and their log-probabilities of ``decoder`` over a bf16 KV cache (the server's default)."""
        tokens, logprobs = [], []
        for prompt in prompts:
            cache = KVCache.empty(model.config, 1, max_len=len(prompt) + n, dtype=torch.bfloat16)
            logits, out = decoder.prefill(torch.tensor([prompt]), cache), []
            while True:
                out.append(int(logits[0].argmax()))
                logprobs.append(float(logits[0].log_softmax(-1).max()))
                if len(out) == n:
                    break
                logits = decoder.step(torch.tensor(out[-1:]), cache)
            tokens.append(out)
        return tokens, logprobs

    def served(weights: str) -> tuple[str, list[list[int]], list[float]]:
        engine = make_engine(ServeConfig(weights=weights, prefix_cache_mb=0), lambda: None)
        engine.model = model
        batch = engine.new_batch()
        assert bool(batch.ride_idle) == isinstance(batch.decoder, NativeDecoder)  # a short prompt rides an idle batch
        batch.ride_idle = 0
        seqs = [Seq(p, SamplingConfig(temperature=0.0, stop_at_eot=False), n, logprobs=0) for p in prompts]
        for seq in seqs:  # one at a time: each prefilled, as alone()
            batch.add(seq)
            while not seq.done:
                batch.step()
        return batch.decoder.weights, [s.tokens for s in seqs], [lp for s in seqs for lp in s.token_logprobs]

    with torch.inference_mode():
        (half, half_tokens, half_lps), (full, fp32_tokens, fp32_lps) = served("bf16"), served("fp32")
        want_half, want_fp32 = alone(NativeDecoder(model, weights=bf16_arithmetic())), alone(NativeDecoder(model))
    assert (half, full) == (bf16_arithmetic(), "fp32")
    assert half_tokens == want_half[0] and fp32_tokens == want_fp32[0]
    assert half_lps == pytest.approx(want_half[1], abs=1e-6) and fp32_lps == pytest.approx(want_fp32[1], abs=1e-6)
    assert max(abs(a - b) for a, b in zip(half_lps, fp32_lps)) > 1e-4  # the rounding reaches the step
    monkeypatch.setattr(NativeDecoder, "why_not", classmethod(lambda cls, *a: "no C++ library here"))
    engine = make_engine(ServeConfig(), lambda: None)
    engine.model = model
    with caplog.at_level("WARNING", logger="slmkit.serve"):
        assert not isinstance(engine.new_batch().decoder, NativeDecoder)
        engine.new_batch()
    assert caplog.text.count("--weights bf16 is off") == 1 and "no C++ library here" in caplog.text


def test_the_server_sets_openmp_passive_before_torch_loads_unless_the_user_chose():
    """OpenMP reads OMP_WAIT_POLICY once, when PyTorch loads: after passive_openmp() and then
    ``import torch`` libgomp reports (OMP_DISPLAY_ENV) a spin count of 0, not its default 300000;
    a user's own choice (active) stays."""
    def spin_count(preset: str | None) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        env.update(OMP_DISPLAY_ENV="verbose", **({"OMP_WAIT_POLICY": preset} if preset else {}))
        code = "from slmkit.serve.cli import passive_openmp; passive_openmp(); import torch"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        shown = [line for line in (out.stdout + out.stderr).splitlines() if "GOMP_SPINCOUNT" in line]
        if not shown:
            pytest.skip("this PyTorch's OpenMP runtime is not libgomp or does not show its settings")
        return shown[0].split("=")[1].strip()

    assert spin_count(None) == "'0'"
    assert spin_count("active") not in ("'0'", "'300000'")  # active spins far longer
