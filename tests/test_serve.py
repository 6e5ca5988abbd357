"""`reasonedit serve` with the official `openai` client, on the bundled demo VLM.

One server per module (the models load once); a second and third engine share its
loaded models through `Editor.with_codebook`, each with its own limits.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from typer.testing import CliRunner

from reasonedit_cli.cli import app
from reasonedit_cli.datasets import read_edits, read_questions
from reasonedit_cli.editor import Editor
from reasonedit_cli.errors import UsageError
from reasonedit_cli.server import (
    ApiError,
    Engine,
    ServeOptions,
    ServerThread,
    StreamText,
    parse_chat_request,
)
from reasonedit_cli.store import Codebook

SAMPLES = Path(__file__).resolve().parent.parent / "sample_edits"
KEY = "sekret-key"


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def messages(image: Path | str, question: str) -> list[dict]:
    url = image if isinstance(image, str) else data_url(image)
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": question},
            ],
        }
    ]


def rounded(obj):
    """Floats to 5 decimals: a query embedded in another batch than `ask`'s differs in
    the last bits of its distances (BLAS), never in its facts or answer."""
    if isinstance(obj, float):
        return round(obj, 5) + 0.0
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    return obj


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def get_json(url: str, key: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def sample_edits():
    edits, _ = read_edits(str(SAMPLES / "edits.jsonl"), "jsonl")
    return edits


@pytest.fixture(scope="module")
def questions():
    return read_questions(str(SAMPLES / "edits.jsonl"))


@pytest.fixture(scope="module")
def served(tmp_path_factory, sample_edits):
    """A codebook with the three shape edits, served on a free loopback port."""
    cb = tmp_path_factory.mktemp("serve") / "cb"
    editor = Editor(cb, create=True)
    editor.add_edits(sample_edits[:3], patches="none")
    server = ServerThread(editor, ServeOptions(port=0, poll_interval=0.1))
    yield server, editor, cb
    server.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0)


def ask_all(client, questions, **kwargs):
    """All questions at once from threads, so the server batches them."""
    out: list = [None] * len(questions)

    def one(i: int) -> None:
        it = questions[i]
        out[i] = client.chat.completions.create(
            model="reasonedit", messages=messages(Path(it["where_image"]), it["question"]), **kwargs
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.fixture(scope="module")
def question_files(questions):
    rows = [json.loads(line) for line in (SAMPLES / "edits.jsonl").read_text().splitlines()]
    return [dict(q, where_image=str(SAMPLES / r["image"])) for q, r in zip(questions, rows)]


# ------------------------------------------------------------------ answers
def test_answers_and_extension_equal_ask(served, client, question_files):
    server, editor, _ = served
    local = editor.ask(
        [q["image"] for q in question_files], [q["question"] for q in question_files]
    )
    got = ask_all(client, question_files)
    for resp, ans in zip(got, local):
        ext = resp.model_extra["reasonedit"]
        assert resp.choices[0].message.content == ans.answer
        assert resp.choices[0].finish_reason == "stop"
        assert ext["version"] == editor.version
        assert rounded({k: v for k, v in ext.items() if k != "version"}) == rounded(ans.to_dict())
        assert resp.usage.completion_tokens == 1 and resp.usage.prompt_tokens > 10
    # the shape edits apply to their own questions
    assert all(not r.model_extra["reasonedit"]["rejected"] for r in got[:3])
    # requests that arrived together shared generate calls
    status, health = get_json(server.url + "/healthz")
    assert status == 200 and health["batches"] < health["requests"]


def test_streaming_adds_up_to_the_answer(client, question_files):
    q = question_files[0]
    plain = client.chat.completions.create(
        model="reasonedit", messages=messages(Path(q["where_image"]), q["question"])
    )
    chunks = list(
        client.chat.completions.create(
            model="reasonedit",
            messages=messages(Path(q["where_image"]), q["question"]),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    ext = finals[0].model_extra["reasonedit"]
    assert ext["facts"] == plain.model_extra["reasonedit"]["facts"]
    assert chunks[-1].usage.completion_tokens == 1


def test_max_tokens_stop_and_temperature(client, question_files):
    q = question_files[0]
    msg = messages(Path(q["where_image"]), q["question"])
    full = client.chat.completions.create(model="reasonedit", messages=msg)
    answer = full.choices[0].message.content
    # one token is the whole answer but not the end of sequence: "length"
    short = client.chat.completions.create(model="reasonedit", messages=msg, max_tokens=1)
    assert short.choices[0].message.content == answer
    assert short.choices[0].finish_reason == "length"
    cut = client.chat.completions.create(model="reasonedit", messages=msg, stop=[answer[2:]])
    assert cut.choices[0].message.content == answer[:2]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model="reasonedit", messages=msg, stop=answer[2:], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == answer[:2]
    sampled = client.chat.completions.create(
        model="reasonedit", messages=msg, temperature=1.5, top_p=0.9
    )
    assert sampled.choices[0].message.content.strip()


def test_models_healthz_and_codebook(served, client):
    server, editor, _ = served
    assert [m.id for m in client.models.list()] == ["bundled:demo_vlm"]
    status, info = get_json(server.url + "/v1/codebook")
    assert status == 200
    assert (info["version"], info["edits"]) == (editor.version, 3)
    assert info["keys"] == editor.codebook.n_keys
    status, health = get_json(server.url + "/healthz")
    assert health["status"] == "ok" and health["version"] == editor.version


def test_ask_server_prints_what_local_ask_prints(served, question_files, monkeypatch):
    server, editor, _ = served
    # a proxy cannot reach this machine's loopback: ask --server goes around it
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    runner = CliRunner()
    args = ["ask", "--server", server.url, "--from", str(SAMPLES / "edits.jsonl")]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    local = editor.ask(
        [q["image"] for q in question_files], [q["question"] for q in question_files]
    )
    got = [json.loads(line) for line in res.stdout.splitlines()]
    assert [list(r) for r in got] == [["id", *a.to_dict()] for a in local]  # same fields
    assert rounded(got) == rounded(
        [{"id": q["id"], **a.to_dict()} for q, a in zip(question_files, local)]
    )
    plain = runner.invoke(app, args)
    assert plain.stdout.split() == [a.answer for a in local]
    bad = runner.invoke(app, ["ask", "--server", "http://127.0.0.1:9", *args[3:]])
    assert bad.exit_code == 1 and "cannot reach the server" in bad.output


# --------------------------------------------------------------- live edits
def test_an_edit_added_while_serving_changes_the_next_answer(
    served, client, question_files, sample_edits
):
    server, editor, cb = served
    q = question_files[3]  # a colour edit the codebook does not hold yet
    msg = messages(Path(q["where_image"]), q["question"])
    before = client.chat.completions.create(model="reasonedit", messages=msg)
    assert before.model_extra["reasonedit"]["rejected"]
    old = before.model_extra["reasonedit"]["version"]
    # another writer, with its own models, adds the edit while requests keep coming
    writer = Editor(cb)
    versions: list[int] = []
    stop = threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            r = client.chat.completions.create(model="reasonedit", messages=msg)
            versions.append(r.model_extra["reasonedit"]["version"])

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        new = writer.add_edits([sample_edits[3]], patches="none").version
        wait_for(lambda: get_json(server.url + "/v1/codebook")[1]["version"] == new)
    finally:
        stop.set()
        asker.join()
    after = client.chat.completions.create(model="reasonedit", messages=msg)
    ext = after.model_extra["reasonedit"]
    assert ext["version"] == new > old
    assert not ext["rejected"] and after.choices[0].message.content == sample_edits[3].answer
    assert before.choices[0].message.content != sample_edits[3].answer
    # in-flight requests answered on one version or the other, in order
    assert versions and set(versions) <= {old, new} and versions == sorted(versions)


def test_a_damaged_version_is_refused_and_the_last_good_one_serves(
    served, sample_edits, question_files, tmp_path, caplog
):
    _, editor, cb = served
    copy = tmp_path / "cb"
    shutil.copytree(cb, copy)
    sibling = editor.with_codebook(Codebook.open(copy).load())
    with ServerThread(sibling, ServeOptions(port=0, poll_interval=3600)) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        good = sibling.version
        new = sibling.with_codebook(Codebook.open(copy)).add_edits(
            [sample_edits[4]], patches="none"
        )
        seg = next(
            s for s in Codebook.open(copy).manifest["segments"] if s["version"] == new.version
        )
        path = copy / seg["path"]
        original = path.read_bytes()
        path.write_bytes(original[:-20] + b"\0" * 20)
        q = question_files[4]
        msg = messages(Path(q["where_image"]), q["question"])
        with caplog.at_level(logging.ERROR, logger="reasonedit.serve"):
            r = c.chat.completions.create(model="reasonedit", messages=msg)
            assert r.model_extra["reasonedit"]["version"] == good
            # the check after that request refuses the damaged version, with a log line
            wait_for(lambda: "refused the new codebook version" in caplog.text)
        r = c.chat.completions.create(model="reasonedit", messages=msg)
        assert r.model_extra["reasonedit"]["version"] == good
        path.write_bytes(original)  # repaired: the next check switches
        c.chat.completions.create(model="reasonedit", messages=msg)
        wait_for(lambda: get_json(server.url + "/v1/codebook")[1]["version"] == new.version)


# ------------------------------------------------------------ limits, keys
@pytest.fixture(scope="module")
def guarded(served):
    _, editor, _ = served
    sibling = editor.with_codebook(editor.codebook)
    options = ServeOptions(
        port=0, api_key=KEY, max_body_bytes=300_000, max_image_bytes=100_000, max_tokens_limit=8
    )
    with ServerThread(sibling, options) as server:
        yield server


def test_api_key_is_checked_on_every_request(guarded, question_files):
    q = question_files[0]
    msg = messages(Path(q["where_image"]), q["question"])
    for key in ("wrong", ""):
        c = openai.OpenAI(base_url=guarded.url + "/v1", api_key=key or "-", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            c.chat.completions.create(model="reasonedit", messages=msg)
        assert err.value.body["code"] == "invalid_api_key"
    for path in ("/healthz", "/v1/models", "/v1/codebook"):
        assert get_json(guarded.url + path)[0] == 401
        assert get_json(guarded.url + path, KEY)[0] == 200
    ok = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0)
    assert ok.chat.completions.create(model="reasonedit", messages=msg).choices[0].message.content


def _post(url: str, body: bytes, key: str = KEY) -> tuple[int, dict]:
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_openai_errors_with_the_right_status(guarded, question_files, tmp_path):
    c = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0)
    q = question_files[0]
    image = Path(q["where_image"])
    big = tmp_path / "big.png"
    big.write_bytes(image.read_bytes() + b"\0" * 120_000)  # over the 100 kB image limit
    cases = [
        (dict(messages=[{"role": "user", "content": "what shape?"}]), 400, "messages"),
        (dict(messages=messages(image, q["question"]) * 2), 400, "messages"),
        (dict(messages=messages(image, q["question"]), max_tokens=9), 400, "max_tokens"),
        (dict(messages=messages(image, q["question"]), temperature=3), 400, "temperature"),
        (dict(messages=messages(image, q["question"]), n=2), 400, "n"),
        (dict(messages=messages("data:image/png;base64,!!!", "q")), 400, None),
        (dict(messages=messages("data:image/png;base64,aGVsbG8=", "q")), 400, None),
        (dict(messages=messages("https://example.com/a.png", "q")), 400, None),
        (dict(messages=messages(str(image), "q")), 403, None),
        (dict(messages=messages(big, "q")), 413, None),
    ]
    for kwargs, status, param in cases:
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model="reasonedit", **kwargs)
        assert err.value.status_code == status, kwargs
        body = err.value.body
        assert set(body) >= {"message", "type", "code"} and "Traceback" not in body["message"]
        if param:
            assert body["param"] == param
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=messages(image, q["question"]))
    assert _post(guarded.url, b"{not json")[0] == 400
    assert _post(guarded.url, b"[1, 2]")[0] == 400
    status, body = _post(guarded.url, b'{"x": "' + b"a" * 400_000 + b'"}')
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = get_json(guarded.url + "/v1/nothing", KEY)
    assert status == 404 and "error" in body
    # no write endpoints: the codebook takes edits only through the CLI
    req = urllib.request.Request(
        guarded.url + "/v1/codebook", data=b"{}", headers={"Authorization": f"Bearer {KEY}"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 405


def test_full_queue_answers_503_and_slow_requests_504(served, question_files):
    _, editor, _ = served
    sibling = editor.with_codebook(editor.codebook)
    q = question_files[0]
    request = parse_chat_request(
        {"messages": messages(Path(q["where_image"]), q["question"])}, ServeOptions(), {"x"}
    )
    # not started: nothing takes jobs off the queue, so the second one does not fit
    engine = Engine(sibling, ServeOptions(max_queue=1))
    engine.submit(request)
    with pytest.raises(ApiError) as err:
        engine.submit(request)
    assert err.value.status == 503 and err.value.code == "queue_full"
    with ServerThread(sibling, ServeOptions(port=0, timeout=0.001)) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(
                model="reasonedit", messages=messages(Path(q["where_image"]), q["question"])
            )
        assert err.value.status_code == 504 and err.value.body["code"] == "timeout"


# ---------------------------------------------------------------- plumbing
def test_stream_text_holds_back_what_may_change():
    s = StreamText(["END"])
    assert [s.delta("tri"), s.delta("tria "), s.delta("tria E"), s.delta("tria EN")] == [
        "tri",
        "a",
        "",
        "",
    ]
    # the stop sequence ends the answer; what came before it stays, as without streaming
    assert s.delta("tria ENDx") == " " and s.delta("tria ENDxy") == "" and s.sent == "tria "
    t = StreamText([])
    assert t.delta("a ") == "a" and t.delta("a b") == " b" and t.rest("a b") == ""


def test_binding_beyond_loopback_needs_an_api_key():
    with pytest.raises(UsageError):
        ServeOptions(host="0.0.0.0").check()
    ServeOptions(host="0.0.0.0", api_key="k").check()
    ServeOptions(host="::1").check()
    res = CliRunner().invoke(app, ["serve", "--host", "192.0.2.1", "-c", "/nonexistent"])
    assert res.exit_code == 2 and "--api-key" in res.output


# ----------------------------------------------- multi-token answers (tiny LLaVA)
@pytest.fixture(scope="module")
def tiny_server(tiny_llava):
    """No codebook, the tiny random-weight LLaVA: long answers to stream."""
    editor = Editor(None, model=str(tiny_llava), device="cpu")
    with ServerThread(editor, ServeOptions(port=0)) as server:
        yield server, editor


def test_complete_cuts_rows_at_their_budgets_and_streams_growing_prefixes(
    tiny_server, question_files
):
    _, editor = tiny_server
    vlm = editor.vlm
    imgs = [q["image"] for q in question_files[:3]]
    prompts = [q["question"] for q in question_files[:3]]
    full_steps: dict[int, list[list[int]]] = {}
    full = vlm.complete(
        imgs,
        prompts,
        max_new_tokens=8,
        on_tokens=lambda r, ids: full_steps.setdefault(r, []).append(ids),
    )
    assert full == vlm.complete(imgs, prompts, max_new_tokens=8)  # streaming changes nothing
    budgets = [2, 5, 8]
    cut = vlm.complete(imgs, prompts, max_new_tokens=budgets)
    for i, n in enumerate(budgets):
        seq = full_steps[i]
        # one more token per step, each step extending the last
        assert all(b[: len(a)] == a and len(b) == len(a) + 1 for a, b in zip(seq, seq[1:]))
        assert vlm.decode(seq[-1]) == full[i].text
        assert cut[i].text == vlm.decode(seq[min(n, len(seq)) - 1])
        assert cut[i].tokens == min(n, full[i].tokens)
    assert vlm.generate(imgs, prompts, max_new_tokens=8) == [c.text for c in full]


def test_streamed_deltas_add_up_with_long_answers_and_stops(tiny_server, question_files):
    server, _ = tiny_server
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    q = question_files[1]
    msg = messages(Path(q["where_image"]), q["question"])
    plain = c.chat.completions.create(model="reasonedit", messages=msg, max_tokens=12)
    text = plain.choices[0].message.content
    assert len(text) > 4 and plain.usage.completion_tokens > 1
    ext = plain.model_extra["reasonedit"]
    # no codebook: searched, nothing found, nothing prepended
    assert ext["searched"] and ext["rejected"] and not ext["edited"] and ext["version"] is None
    for stop in (None, text[len(text) // 2 : len(text) // 2 + 2]):
        kwargs = {"stop": stop} if stop else {}
        want = c.chat.completions.create(model="reasonedit", messages=msg, max_tokens=12, **kwargs)
        chunks = list(
            c.chat.completions.create(
                model="reasonedit", messages=msg, max_tokens=12, stream=True, **kwargs
            )
        )
        pieces = [ch.choices[0].delta.content or "" for ch in chunks]
        assert "".join(pieces) == want.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == want.choices[0].finish_reason
    assert sum(1 for p in pieces if p) >= 1


def test_parse_chat_request_reads_the_openai_fields(question_files):
    q = question_files[0]
    msg = messages(Path(q["where_image"]), q["question"])
    opts = ServeOptions()
    ids = {"reasonedit"}
    r = parse_chat_request(
        {
            "messages": [{"role": "system", "content": "be brief"}, *msg],
            "max_tokens": 3,
            "stop": "x",
            "temperature": 0.5,
            "stream": True,
            "stream_options": {"include_usage": True},
            "reasonedit": {"no_edit": True, "top_k": 2, "percentile": 40},
        },
        opts,
        ids,
    )
    assert (r.question, r.max_tokens, r.stop, r.temperature) == (q["question"], 3, ["x"], 0.5)
    assert r.stream and r.include_usage and r.no_edit and (r.top_k, r.percentile) == (2, 40.0)
    assert r.image.size == q["image"].size
    # model omitted: the served one; defaults: greedy, ask's 16 tokens
    d = parse_chat_request({"messages": msg}, opts, ids)
    assert (d.temperature, d.max_tokens, d.stop, d.stream) == (0.0, 16, [], False)
    bad = [
        {"messages": [*msg, {"role": "assistant", "content": "circle"}]},
        {"messages": msg, "stream": "yes"},
        {"messages": msg, "reasonedit": {"explain": True}},
        {"messages": msg, "reasonedit": {"top_k": 0}},
        {"messages": msg, "stop": ["a", "b", "c", "d", "e"]},
        {"messages": msg, "max_tokens": 2.5},
        {"messages": []},
        "not an object",
    ]
    for body in bad:
        with pytest.raises(ApiError) as err:
            parse_chat_request(body, opts, ids)
        assert err.value.status == 400, body


def test_requests_beyond_the_in_flight_limit_get_an_openai_503():
    import asyncio

    from reasonedit_cli.server import InFlightLimit

    calls = []

    async def app(scope, receive, send):
        calls.append(scope["path"])

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def run():
        limited = InFlightLimit(app, 1)
        await limited({"type": "http", "path": "/a"}, None, send)  # under the limit
        limited.active = 1  # one request in flight
        await limited({"type": "http", "path": "/b"}, None, send)
        return limited.active

    assert asyncio.run(run()) == 1 and calls == ["/a"]
    assert sent[0]["status"] == 503
    assert json.loads(sent[1]["body"])["error"]["code"] == "too_many_requests"
