"""Hugging Face ids: the local cache first, one clear line when a model cannot be had.

`from_pretrained` with a hub id asks the hub for every file and, when the network is
down, retries for half a minute while printing warnings. reasonedit resolves an id to a
snapshot folder first: from the local cache (`local_files_only=True`), else, when the hub
answers, by downloading it; when neither works it fails at once with one line saying
what to do. The models are then loaded from that folder, which touches no network.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from reasonedit_cli.errors import ReasonEditError

#: Seconds to wait for the hub's TCP port before calling it unreachable.
CONNECT_TIMEOUT = 3.0
_TRUE = ("1", "true", "yes", "on")


def looks_like_hub_id(name: str) -> bool:
    """`ORG/NAME` or `NAME` that is not an existing path and not written as one."""
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return False
    return name.count("/") <= 1 and bool(name.strip("/"))


def offline() -> bool:
    """True when the user asked for no network (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return any(
        os.environ.get(v, "").strip().lower() in _TRUE
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_reachable(timeout: float = CONNECT_TIMEOUT) -> bool:
    """Whether the hub endpoint (HF_ENDPOINT, default huggingface.co) accepts a connection."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model(name: str, what: str = "model") -> str:
    """A local folder for `name`: itself when it is a path, else its cached snapshot.

    Raises a one-line `ReasonEditError` when the id is not cached and cannot be
    downloaded (offline mode, or the hub does not answer within CONNECT_TIMEOUT).
    """
    if not looks_like_hub_id(name):
        return str(Path(name).expanduser())
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(name, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    except (OSError, ValueError, HfHubHTTPError) as exc:
        raise ReasonEditError(
            f"cannot read {what} {name} from the Hugging Face cache: {exc}"
        ) from None
    where = "the Hugging Face cache (HF_HOME, default ~/.cache/huggingface)"
    if offline():
        raise ReasonEditError(
            f"{what} {name} is not in {where} and HF_HUB_OFFLINE is set; download it first "
            f"(hf download {name}) or pass a local directory"
        )
    if not hub_reachable():
        raise ReasonEditError(
            f"{what} {name} is not in {where} and the Hugging Face hub cannot be reached; "
            f"download it on a machine with network (hf download {name}) or pass a local "
            "directory"
        )
    try:
        return snapshot_download(name)
    except (OSError, ValueError, HfHubHTTPError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReasonEditError(f"cannot download {what} {name}: {first}") from None


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record (not at creation)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_library_logging(*, verbose: bool = False) -> None:
    """Keep transformers' and the hub's logging off stderr unless `verbose`.

    Without it only errors are shown (reasonedit reports failures itself, in one line);
    with it their info messages and warnings come through.
    """
    level = "info" if verbose else "error"
    os.environ["TRANSFORMERS_VERBOSITY"] = level
    os.environ["HF_HUB_VERBOSITY"] = level
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "0" if verbose else "1"
    py_level = logging.INFO if verbose else logging.ERROR
    for name in ("transformers", "huggingface_hub", "sentence_transformers", "urllib3"):
        logging.getLogger(name).setLevel(py_level)
    if "transformers" in sys.modules:  # already imported: the environment is read
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(py_level)
        (hf_logging.enable_progress_bar if verbose else hf_logging.disable_progress_bar)()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if verbose else disable_progress_bars)()
    if verbose:
        for name in ("huggingface_hub", "sentence_transformers", "urllib3"):
            logger = logging.getLogger(name)
            if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
                logger.addHandler(_StderrHandler())
    else:
        for module in ("transformers", "huggingface_hub", "torch", "sentence_transformers"):
            warnings.filterwarnings("ignore", module=module)
