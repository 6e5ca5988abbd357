"""`reasonedit ask --server URL`: ask a running `reasonedit serve` over HTTP.

Standard library only (urllib), so asking a server needs neither torch nor the server's
packages. Questions are sent in parallel, so the server batches them; each answer comes
back as the record `ask --json` prints locally (the server's `reasonedit` extension).
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from reasonedit_cli.errors import ReasonEditError, UsageError

MAX_PARALLEL = 16
_MIME = {"png": "image/png", "jpeg": "image/jpeg", "gif": "image/gif", "webp": "image/webp"}


def check_url(url: str) -> str:
    """The base URL without a trailing slash; a usage error unless http(s)."""
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"`server` {url!r}: expected http://HOST:PORT")
    return url.rstrip("/").removesuffix("/v1")


def chat_body(
    image_bytes: bytes,
    image_format: str | None,
    question: str,
    *,
    no_edit: bool = False,
    top_k: int | None = None,
    percentile: float | None = None,
    max_new_tokens: int = 16,
) -> dict[str, Any]:
    """The chat-completions request for one (image, question), with ask's options."""
    mime = _MIME.get((image_format or "png").lower(), "image/png")
    url = f"data:{mime};base64,{base64.b64encode(image_bytes).decode('ascii')}"
    ext: dict[str, Any] = {"no_edit": no_edit}
    if top_k is not None:
        ext["top_k"] = top_k
    if percentile is not None:
        ext["percentile"] = percentile
    return {
        "model": "reasonedit",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        "max_tokens": max_new_tokens,
        "reasonedit": ext,
    }


def post_json(
    url: str, body: dict[str, Any], *, api_key: str | None = None, timeout: float = 120.0
) -> dict[str, Any]:
    """POST a JSON body; the decoded answer, or one-line ReasonEditError."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with _opener(url).open(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise ReasonEditError(f"server {url}: {_error_message(exc)} (HTTP {exc.code})") from None
    except urllib.error.URLError as exc:
        raise ReasonEditError(f"cannot reach the server at {url}: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:
        raise ReasonEditError(f"cannot reach the server at {url}: {exc}") from None
    except ValueError:
        raise ReasonEditError(f"server {url}: the answer is not JSON") from None


def _opener(url: str) -> urllib.request.OpenerDirector:
    """urllib's opener; a server on this machine is reached directly, never via a proxy
    that HTTP_PROXY names (it could not reach this machine's loopback)."""
    from reasonedit_cli.server import is_loopback

    host = urllib.parse.urlsplit(url).hostname or ""
    if is_loopback(host):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"]["message"])
    except Exception:
        return exc.reason or "error"


def ask_server(
    url: str,
    items: Sequence[dict[str, Any]],
    *,
    no_edit: bool = False,
    top_k: int | None = None,
    percentile: float | None = None,
    max_new_tokens: int = 16,
    api_key: str | None = None,
    timeout: float = 120.0,
) -> list[dict[str, Any]]:
    """The `ask --json` record of each item (`{image_bytes, image, question}`), in order."""
    endpoint = check_url(url) + "/v1/chat/completions"

    def one(item: dict[str, Any]) -> dict[str, Any]:
        body = chat_body(
            item["image_bytes"],
            getattr(item["image"], "format", None),
            item["question"],
            no_edit=no_edit,
            top_k=top_k,
            percentile=percentile,
            max_new_tokens=max_new_tokens,
        )
        answer = post_json(endpoint, body, api_key=api_key, timeout=timeout)
        record = answer.get("reasonedit")
        if not isinstance(record, dict):
            raise ReasonEditError(f"server {url} is not a reasonedit server (no 'reasonedit')")
        record = {k: v for k, v in record.items() if k != "version"}
        # the answer after the request's stop sequences, as the server sent it
        record["answer"] = answer["choices"][0]["message"]["content"]
        return record

    with ThreadPoolExecutor(max_workers=max(1, min(MAX_PARALLEL, len(items)))) as pool:
        return list(pool.map(one, items))
