"""`reasonedit serve`: the edited model behind an OpenAI-compatible HTTP endpoint.

Three parts, each usable alone:

- `parse_chat_request` turns an OpenAI chat-completions body into a `ChatRequest`
  (one image, one question, the generation settings) or raises `ApiError`.
- `Engine` owns the models and the codebook snapshot. One worker thread takes queued
  requests, batches those that arrive within `batch_wait_ms` into one `Editor.ask_each`
  call, and answers each on the version its batch started with. A watcher thread checks
  the manifest between batches (and every `poll_interval` seconds), loads a new version
  beside the one serving, and switches only once it is fully read and verified; a
  damaged version is refused with a log line and the last good one keeps serving.
- `create_app` is the Starlette application (routes, API key, size limits, OpenAI-format
  errors); `serve` runs it with uvicorn, `ServerThread` runs it inside a process (tests,
  benchmarks).

Nothing here writes to the codebook: edits go through the CLI, which keeps one writer.
Starlette and uvicorn are imported only by `create_app`/`serve`, so the rest of the
package (and `reasonedit --help`) never needs them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import hmac
import ipaddress
import json
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reasonedit_cli.errors import ReasonEditError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from reasonedit_cli.editor import Answer, Editor

log = logging.getLogger("reasonedit.serve")

#: Accepted as the request's `model` besides the served model's own name.
MODEL_ALIAS = "reasonedit"
MAX_STOP = 4  # OpenAI allows up to 4 stop sequences


@dataclass
class ServeOptions:
    """Limits and settings of one server; the CLI's `serve` options map onto these."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allow_local_files: bool = False
    max_batch: int = 16  # requests per generate call
    batch_wait_ms: float = 5.0  # how long a first request waits for others to join
    max_queue: int = 64  # waiting requests; one more is answered 503
    timeout: float = 60.0  # seconds per request, queueing included
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024
    max_tokens_limit: int = 256
    default_max_tokens: int = 16  # `ask`'s --max-new-tokens default
    poll_interval: float = 1.0  # seconds between manifest checks when idle

    def check(self) -> None:
        """Usage errors, before any model loads: above all, no open port without a key."""
        if not is_loopback(self.host) and not self.api_key:
            raise UsageError(
                f"`host` {self.host} is reachable from other machines: give `api_key` KEY "
                "(or REASONEDIT_API_KEY) to bind there"
            )
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_image_bytes"):
            if getattr(self, name) < 1:
                raise UsageError(f"`{name}` must be at least 1")
        if self.max_tokens_limit < 1:
            raise UsageError("`max_tokens_limit` must be at least 1")
        if self.timeout <= 0 or self.poll_interval <= 0 or self.batch_wait_ms < 0:
            raise UsageError("`timeout` and `poll_interval` must be positive")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"`port` {self.port}: expected 0..65535")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------ errors
class ApiError(Exception):
    """An error answered in the OpenAI format: `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ----------------------------------------------------------------- parsing
@dataclass
class ChatRequest:
    """What one chat-completions request asks: one image, one question, settings."""

    image: Any  # PIL image
    question: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    no_edit: bool = False
    top_k: int | None = None
    percentile: float | None = None


_DATA_URL = re.compile(r"data:(image/[A-Za-z0-9.+-]+)?(;[^,]*)?,", re.S)


def parse_chat_request(body: Any, options: ServeOptions, model_ids: set[str]) -> ChatRequest:
    """Validate an OpenAI chat-completions body; raise ApiError(400/404) on bad input.

    The model answers one question about one image, so the messages must hold exactly
    one user message (system and developer messages are accepted and not used) with
    one image and some text. Sampling is greedy unless `temperature` > 0, so that an
    answer equals `reasonedit ask`'s.
    """
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model not in model_ids:
        raise ApiError(
            404,
            f"model {model!r} is not served here; use one of {', '.join(sorted(model_ids))}",
            param="model",
            code="model_not_found",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    users = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a 'role'", "messages")
        if m["role"] == "user":
            users.append(m)
        elif m["role"] not in ("system", "developer"):
            raise _bad(
                f"messages[{i}] has role {m['role']!r}: one user message is supported "
                "(the model answers one question about one image)",
                "messages",
            )
    if len(users) != 1:
        raise _bad(
            f"expected exactly one user message, got {len(users)} "
            "(the model answers one question about one image)",
            "messages",
        )
    texts, images = _content_parts(users[0].get("content"), options)
    if len(images) != 1:
        raise _bad(
            f"the user message must hold exactly one image_url part, got {len(images)}",
            "messages",
        )
    from reasonedit_cli.edits import clean_text
    from reasonedit_cli.errors import InputError

    try:
        question = clean_text(" ".join(texts), "question", "the user message")
    except InputError as exc:
        raise _bad(str(exc), "messages") from None
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise _bad("only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(options.default_max_tokens, options.max_tokens_limit)
    if type(max_tokens) is not int or not 1 <= max_tokens <= options.max_tokens_limit:
        raise _bad(
            f"'max_tokens' must be an integer from 1 to {options.max_tokens_limit}", "max_tokens"
        )
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise _bad("'top_p' must be above 0", "top_p")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise _bad(f"'stop' must be a string or a list of up to {MAX_STOP} strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    ext = body.get("reasonedit") or {}
    if not isinstance(ext, dict):
        raise _bad("'reasonedit' must be an object", "reasonedit")
    unknown = set(ext) - {"no_edit", "top_k", "percentile"}
    if unknown:
        raise _bad(f"unknown reasonedit option {sorted(unknown)[0]!r}", "reasonedit")
    no_edit = ext.get("no_edit", False)
    top_k = ext.get("top_k")
    percentile = ext.get("percentile")
    if not isinstance(no_edit, bool):
        raise _bad("'reasonedit.no_edit' must be true or false", "reasonedit")
    if top_k is not None and (type(top_k) is not int or not 1 <= top_k <= 1000):
        raise _bad("'reasonedit.top_k' must be an integer from 1 to 1000", "reasonedit")
    if percentile is not None and (
        type(percentile) not in (int, float) or not 0 <= percentile <= 100
    ):
        raise _bad("'reasonedit.percentile' must be a number from 0 to 100", "reasonedit")
    return ChatRequest(
        image=images[0],
        question=question,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=list(stops),
        stream=stream,
        include_usage=bool(stream_options.get("include_usage", False)),
        no_edit=no_edit,
        top_k=top_k,
        percentile=None if percentile is None else float(percentile),
    )


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if type(value) not in (int, float) or not lo <= value <= hi:
        raise _bad(f"'{name}' must be a number from {lo:g} to {hi:g}", name)
    return float(value)


def _content_parts(content: Any, options: ServeOptions) -> tuple[list[str], list[Any]]:
    """The text pieces and decoded images of a user message's content."""
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise _bad("the user message's 'content' must be a string or a list of parts", "messages")
    texts: list[str] = []
    images: list[Any] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise _bad(f"content[{i}]: image_url needs a 'url' string", "messages")
            images.append(_load_image(url, options, f"content[{i}]"))
        else:
            raise _bad(
                f"content[{i}]: unsupported part {kind!r} (expected text or image_url)",
                "messages",
            )
    return texts, images


def _load_image(url: str, options: ServeOptions, where: str) -> Any:
    """A data URL (always) or a local path / file:// URL (only with --allow-local-files)."""
    from reasonedit_cli.edits import decode_image, read_image_file
    from reasonedit_cli.errors import InputError

    limit = options.max_image_bytes
    if url.startswith("data:"):
        m = _DATA_URL.match(url)
        if m is None or "base64" not in (m.group(2) or ""):
            raise _bad(f"{where}: expected a base64 data URL (data:image/png;base64,...)")
        payload = url[m.end() :]
        if len(payload) > (limit * 4) // 3 + 4:
            raise ApiError(
                413, f"{where}: image is larger than {limit} bytes", code="image_too_large"
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(f"{where}: the data URL is not valid base64") from None
        if len(data) > limit:
            raise ApiError(
                413, f"{where}: image is larger than {limit} bytes", code="image_too_large"
            )
        try:
            return decode_image(data, f"{where}: image")
        except InputError as exc:
            raise _bad(str(exc)) from None
    if url.startswith(("http://", "https://")):
        raise _bad(f"{where}: remote image URLs are not fetched; send a base64 data URL")
    if not options.allow_local_files:
        raise ApiError(
            403,
            f"{where}: local image paths need the server started with --allow-local-files",
            type="permission_error",
            code="local_files_disabled",
        )
    path = Path(url[len("file://") :] if url.startswith("file://") else url)
    try:
        if path.stat().st_size > limit:
            raise ApiError(
                413, f"{where}: image is larger than {limit} bytes", code="image_too_large"
            )
        return read_image_file(path, where)[2]
    except InputError as exc:
        raise _bad(str(exc)) from None
    except OSError as exc:
        raise _bad(f"{where}: cannot read image {path}: {exc.strerror or exc}") from None


def apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text cut before the first stop sequence, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


# ------------------------------------------------------------------ engine
@dataclass
class Job:
    """One queued request: its settings, where its result goes, and its deadline."""

    request: ChatRequest
    future: concurrent.futures.Future
    deadline: float
    on_text: Callable[[str], None] | None = None  # streaming: answer text so far


@dataclass
class Result:
    answer: Answer
    version: int | None
    batch: int  # how many requests shared the generate call


class Engine:
    """The models, the serving codebook snapshot, the batching worker and the watcher."""

    def __init__(self, editor: Editor, options: ServeOptions) -> None:
        self.options = options
        self._editor = editor
        self._swap = threading.Lock()
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=options.max_queue)
        self._stop = threading.Event()
        self._check = threading.Event()  # set between batches: look at the manifest now
        self._threads: list[threading.Thread] = []
        self._refused: str | None = None
        self.stats = {"requests": 0, "batches": 0, "reloads": 0}
        self.started = time.time()

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        """Load the models and the codebook now (not on the first request), then serve."""
        editor = self._editor
        if editor.codebook is not None:
            editor.codebook.load()
        _ = editor.vlm
        if editor.codebook_has_keys:
            _ = editor.embedder  # the text encoder with it
        for target, name in ((self._work, "batcher"), (self._watch, "watcher")):
            t = threading.Thread(target=target, name=f"reasonedit-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("serving codebook version %s (%s)", self.version, self.model_id)

    def stop(self) -> None:
        self._stop.set()
        self._check.set()
        for t in self._threads:
            t.join(timeout=5)

    # -- views -------------------------------------------------------------
    @property
    def editor(self) -> Editor:
        with self._swap:
            return self._editor

    @property
    def version(self) -> int | None:
        return self.editor.version

    @property
    def model_id(self) -> str:
        return self.editor.model_name

    def model_ids(self) -> set[str]:
        return {self.model_id, MODEL_ALIAS}

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def codebook_info(self) -> dict[str, Any]:
        ed = self.editor
        cb = ed.codebook
        if cb is None:
            return {"version": None, "edits": 0, "keys": 0}
        cfg = cb.config
        return {
            "version": cb.version,
            "edits": len(cb.edit_ids()),
            "keys": cb.n_keys,
            "updated": cb.manifest.get("updated"),
            "model": cfg.get("model"),
            "text_model": cfg.get("text_model"),
            "layer": cfg.get("layer"),
            "w": cfg.get("w"),
            "threshold": cb.tau if cb.n_keys else None,
            "path": str(cb.path),
        }

    # -- requests ----------------------------------------------------------
    def submit(self, request: ChatRequest, on_text: Callable[[str], None] | None = None) -> Job:
        """Queue a request; ApiError(503) when the queue is full."""
        job = Job(
            request=request,
            future=concurrent.futures.Future(),
            deadline=time.monotonic() + self.options.timeout,
            on_text=on_text,
        )
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ApiError(
                503,
                f"the server is busy ({self.options.max_queue} requests waiting); retry later",
                type="server_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        return job

    def _work(self) -> None:
        """The batching loop: one batch at a time, all model work on this thread."""
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            jobs = [first]
            until = time.monotonic() + self.options.batch_wait_ms / 1000.0
            while len(jobs) < self.options.max_batch:
                wait = until - time.monotonic()
                try:
                    jobs.append(
                        self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
            now = time.monotonic()
            live = []
            for job in jobs:
                if job.future.cancelled() or not job.future.set_running_or_notify_cancel():
                    continue
                if now > job.deadline:
                    job.future.set_exception(_timeout_error(self.options.timeout))
                    continue
                live.append(job)
            if live:
                self._run(live)
            self._check.set()  # between requests: is there a new version?

    def _run(self, jobs: list[Job]) -> None:
        from reasonedit_cli.editor import Query

        editor = self.editor  # the whole batch answers on this snapshot
        version = editor.version
        queries = [
            Query(
                image=j.request.image,
                question=j.request.question,
                no_edit=j.request.no_edit,
                k=j.request.top_k,
                percentile=j.request.percentile,
                max_new_tokens=j.request.max_tokens,
                temperature=j.request.temperature,
                top_p=j.request.top_p,
            )
            for j in jobs
        ]

        def on_tokens(i: int, text: str) -> None:
            send = jobs[i].on_text
            if send is not None:
                send(text)

        streaming = any(j.on_text is not None for j in jobs)
        try:
            answers = editor.ask_each(
                queries, batch_size=len(queries), on_tokens=on_tokens if streaming else None
            )
        except Exception as exc:  # one line to the log and to every client of the batch
            log.error("batch of %d failed: %s: %s", len(jobs), type(exc).__name__, exc)
            err = ApiError(
                500,
                f"the model failed on this request ({type(exc).__name__})",
                type="server_error",
                code="model_error",
            )
            for j in jobs:
                j.future.set_exception(err)
            return
        self.stats["batches"] += 1
        self.stats["requests"] += len(jobs)
        for j, a in zip(jobs, answers):
            j.future.set_result(Result(answer=a, version=version, batch=len(jobs)))

    # -- live edits --------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.is_set():
            self._check.wait(self.options.poll_interval)
            self._check.clear()
            if self._stop.is_set():
                return
            self.reload()

    def reload(self) -> bool:
        """Switch to the newest committed version if it loads cleanly; True on a switch.

        The new version is read and verified beside the serving one; batches already
        running keep their snapshot. A damaged version is logged once and skipped.
        """
        current = self.editor
        if current.codebook is None:
            return False
        try:
            new = current.reload_if_changed()
        except ReasonEditError as exc:
            message = str(exc).replace("\n", " ")
            if message != self._refused:
                log.error(
                    "refused the new codebook version: %s; still serving version %s",
                    message,
                    current.version,
                )
                self._refused = message
            return False
        except Exception as exc:  # never let the watcher die
            log.error("codebook reload failed: %s: %s", type(exc).__name__, exc)
            return False
        if new is None:
            return False
        if new.codebook_has_keys:
            _ = new.embedder  # built here, not on the first request of the new version
        with self._swap:
            self._editor = new
        self._refused = None
        self.stats["reloads"] += 1
        keys = new.require_codebook().n_keys
        log.info("switched to codebook version %s (%d keys)", new.version, keys)
        return True


def _timeout_error(seconds: float) -> ApiError:
    return ApiError(
        504,
        f"the request did not finish within {seconds:g} s",
        type="server_error",
        code="timeout",
    )


# ------------------------------------------------------------ HTTP: answers
def completion_body(result: Result, request: ChatRequest, model: str, rid: str) -> dict:
    """A `chat.completion` object for one answer, with the `reasonedit` extension."""
    text, finish = finish_of(result.answer, request)
    a = result.answer
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": _usage(a),
        "reasonedit": reasonedit_extension(result),
    }


def finish_of(answer: Answer, request: ChatRequest) -> tuple[str, str]:
    """The answer text after stop sequences, and OpenAI's finish_reason for it."""
    text, stopped = apply_stop(answer.answer, request.stop)
    finish = "stop" if stopped or answer.finished else "length"
    return text, finish


def reasonedit_extension(result: Result) -> dict[str, Any]:
    """`ask --json`'s record for the answer, plus the codebook version it used."""
    return {**result.answer.to_dict(), "version": result.version}


def _usage(a: Answer) -> dict[str, int]:
    prompt = int(a.prompt_tokens or 0)
    done = int(a.tokens or 0)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


class StreamText:
    """Turns the growing answer text into deltas that add up to the final answer.

    Text that may still change is held back: trailing whitespace (the final answer is
    stripped), an incomplete character, and any tail that could begin a stop sequence.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.sent = ""
        self.stopped = False

    def delta(self, text: str) -> str:
        if self.stopped:
            return ""
        text, found = apply_stop(text, self.stops)
        if found:
            self.stopped = True
        else:
            for s in self.stops:
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        text = text[:-n]
                        break
            text = text.rstrip().rstrip("\ufffd")
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        out, self.sent = text[len(self.sent) :], text
        return out

    def rest(self, final: str) -> str:
        """What is left to send of the final answer."""
        return final[len(self.sent) :] if final.startswith(self.sent) else ""


# ---------------------------------------------------------------- HTTP: app
def create_app(engine: Engine) -> Any:
    """The Starlette application over an engine (call `engine.start()` first)."""
    try:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response, StreamingResponse
        from starlette.routing import Route
    except ImportError:  # pragma: no cover - depends on the install
        raise ReasonEditError(missing_message()) from None

    options = engine.options

    def error_response(err: ApiError) -> Response:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    def check_key(request: Request) -> None:
        if not options.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), options.api_key.encode()
        ):
            raise ApiError(
                401,
                "missing or wrong API key (Authorization: Bearer KEY)",
                type="authentication_error",
                code="invalid_api_key",
            )

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > options.max_body_bytes:
            raise _too_large(options.max_body_bytes)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > options.max_body_bytes:
                raise _too_large(options.max_body_bytes)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise _bad("the request body is not valid JSON", code="invalid_json") from None

    def guarded(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                check_key(request)
                return await handler(request)
            except ApiError as err:
                return error_response(err)
            except Exception as exc:  # never a traceback to the client
                log.error("error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
                return error_response(
                    ApiError(500, "internal server error", type="server_error", code="internal")
                )

        return endpoint

    async def chat(request: Request) -> Response:
        body = await read_json(request)
        loop = asyncio.get_running_loop()
        # image decoding off the event loop: a large PNG takes a while
        parsed = await loop.run_in_executor(
            None, parse_chat_request, body, options, engine.model_ids()
        )
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        model = engine.model_id
        if parsed.stream:
            return await stream_chat(parsed, rid, model, loop)
        job = engine.submit(parsed)
        result = await _wait(job, options.timeout)
        return JSONResponse(completion_body(result, parsed, model, rid))

    async def stream_chat(parsed: ChatRequest, rid: str, model: str, loop) -> Response:
        texts: asyncio.Queue[str] = asyncio.Queue()
        job = engine.submit(parsed, lambda t: loop.call_soon_threadsafe(texts.put_nowait, t))
        created = int(time.time())

        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
            obj = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            deltas = StreamText(parsed.stop)
            done = asyncio.ensure_future(_wait(job, options.timeout))
            try:
                while not done.done():
                    getter = asyncio.ensure_future(texts.get())
                    await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        piece = deltas.delta(getter.result())
                        if piece:
                            yield chunk({"content": piece})
                    else:
                        getter.cancel()
                result = done.result()
            except ApiError as err:
                yield f"data: {json.dumps(err.body())}\n\n"
                return
            while not texts.empty():
                deltas.delta(texts.get_nowait())
            text, finish = finish_of(result.answer, parsed)
            rest = deltas.rest(text)
            if rest:
                yield chunk({"content": rest})
            yield chunk({}, finish, reasonedit=reasonedit_extension(result))
            if parsed.include_usage:
                obj = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(result.answer),
                }
                yield f"data: {json.dumps(obj)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def models(request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": engine.model_id,
                        "object": "model",
                        "created": int(engine.started),
                        "owned_by": "reasonedit",
                    }
                ],
            }
        )

    async def healthz(request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "version": engine.version,
                "queue": engine.queue_depth(),
                "max_queue": options.max_queue,
                **engine.stats,
            }
        )

    async def codebook(request: Request) -> Response:
        return JSONResponse(engine.codebook_info())

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = {404: "no such endpoint", 405: "method not allowed"}.get(status, "error")
        return error_response(
            ApiError(status, f"{detail}: {request.method} {request.url.path}", code=str(status))
        )

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("error on %s: %s", request.url.path, type(exc).__name__)
        return error_response(
            ApiError(500, "internal server error", type="server_error", code="internal")
        )

    routes = [
        Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/healthz", guarded(healthz), methods=["GET"]),
        Route("/v1/codebook", guarded(codebook), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    return InFlightLimit(app, options.max_queue + options.max_batch + 16)


class InFlightLimit:
    """ASGI middleware: at most `limit` requests in flight (reading a body, parsing,
    queued or answering); one more gets an OpenAI-format 503 at once. It bounds the
    memory that request bodies can hold, where the queue bounds only parsed requests."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.active = 0  # the event loop is single-threaded: no lock needed

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            err = ApiError(
                503,
                f"the server is busy ({self.limit} requests in flight); retry later",
                type="server_error",
                code="too_many_requests",
            )
            body = json.dumps(err.body()).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


async def _wait(job: Job, timeout: float) -> Result:
    """The job's result, or ApiError(504) after `timeout` (the job is then dropped)."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(job.future), timeout)
    except asyncio.TimeoutError:
        job.future.cancel()  # not started yet: the worker skips it
        raise _timeout_error(timeout) from None


def missing_message() -> str:
    return "reasonedit serve needs starlette and uvicorn: pip install 'reasonedit-cli[serve]'"


def check_installed() -> None:
    """One-line error (exit 1) when the server's packages are missing."""
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("starlette", "uvicorn")):
        raise ReasonEditError(missing_message())


# ----------------------------------------------------------------- running
def _uvicorn_config(app: Any, options: ServeOptions, log_level: str) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
        # a backstop on open connections; requests in flight are limited by InFlightLimit
        limit_concurrency=4 * (options.max_queue + options.max_batch + 16),
    )


def serve(
    editor: Editor,
    options: ServeOptions,
    *,
    log_level: str = "info",
    on_ready: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Load everything, then serve until interrupted (the `reasonedit serve` command).

    `on_ready` gets `{url, model, version}` once the socket listens (`serve --json`
    prints it, which tells a script the port `--port 0` chose).
    """
    import uvicorn

    options.check()
    check_installed()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    engine = Engine(editor, options)
    engine.start()

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and on_ready is not None:
                on_ready(
                    {"url": _url_of(self), "model": engine.model_id, "version": engine.version}
                )

    try:
        Server(_uvicorn_config(create_app(engine), options, log_level)).run()
    finally:
        engine.stop()


def _url_of(server: Any) -> str:
    """The base URL a started uvicorn server listens on (the real port for port 0)."""
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ServerThread:
    """A server inside this process on a background thread (tests, benchmarks).

    `with ServerThread(editor, ServeOptions(port=0)) as s: s.url` gives the base URL;
    port 0 picks a free loopback port.
    """

    def __init__(self, editor: Editor, options: ServeOptions, log_level: str = "warning"):
        import uvicorn

        options.check()
        self.engine = Engine(editor, options)
        self.engine.start()
        self.server = uvicorn.Server(_uvicorn_config(create_app(self.engine), options, log_level))
        self.thread = threading.Thread(target=self.server.run, name="reasonedit-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ReasonEditError("the server did not start")
            time.sleep(0.02)
        self.url = _url_of(self.server)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.stop()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
