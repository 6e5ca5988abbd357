"""The Ray engine: add-edit and evaluate with the model work spread over a Ray cluster.

What runs where (docs/distributed.md has the long version):

* **The driver** (the `reasonedit` process) parses and validates the input with the same
  readers as the local engine (same errors, same line numbers), drops edits the codebook
  already holds (idempotence), and cuts the rest into the same batches as the local
  engine. It never loads the VLM.
* **Workers** are Ray Data actors (`map_batches` with an actor pool): each loads the VLM
  and the text encoder once, then runs `Editor.edit_records` -- patch search, dual
  embeddings, radii -- on one batch at a time and writes the batch's keys and edits as
  Parquet files (the codebook's segment schema) into `<codebook>/staging/<job>/`.
* **One committer** (the driver again) verifies every staged file (checksum, schema, row
  counts, that each batch holds exactly its edits and keys), then commits the rows with
  `Editor.commit_records` -- the very call the local engine ends with -- as ONE new
  version. The staging folder is removed whatever happens, and nothing reads it, so a
  crashed or cancelled job leaves the codebook at its previous version.

The auto `w` of a codebook's first insert is set from the first batch's keys
(`calibration.reference_w`). The Ray engine computes that batch first, on one worker,
and hands its w to every other worker, so both engines store the same w and keys.

`evaluate --engine ray` uses long-lived actors instead (`RemoteVLM`): an evaluation makes
many small rounds of VLM calls, and a Ray Data pipeline would load the model again for
each round. Each call is cut at the caller's batch boundaries, so every worker runs the
very batches the local engine runs and the metrics are the same.

Ray is imported only inside these functions: `pip install 'reasonedit-cli[ray]'`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from reasonedit_cli.errors import ReasonEditError, UsageError
from reasonedit_cli.errors import first_line as _first_line

if TYPE_CHECKING:  # pragma: no cover
    from reasonedit_cli.editor import AddReport, Editor
    from reasonedit_cli.edits import Edit
    from reasonedit_cli.vlm import LayerInfo

ENGINES = ("local", "ray")
INSTALL_HINT = "pip install 'reasonedit-cli[ray]'"
#: Methods of `VLM` that `RemoteVLM` runs on the workers (all batched over their inputs).
REMOTE_METHODS = ("generate", "pooled_inputs", "yes_probability", "answer_loss")


@dataclass
class RayOptions:
    """Where and how wide to run (the CLI's --ray-address, --workers, --gpus-per-worker)."""

    address: str | None = None  # None: an already initialised Ray, else a new local one
    workers: int | None = None  # None: one per GPU (with gpus_per_worker), else one per CPU
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0


# ------------------------------------------------------------------ session
def import_ray() -> Any:
    """Ray, or a usage error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"`engine` ray needs Ray: {INSTALL_HINT}") from None
    return ray


@contextlib.contextmanager
def ray_session(options: RayOptions) -> Iterator[Any]:
    """Connect to (or start) Ray for one command; disconnect only what we connected.

    A local instance is started without dashboard or usage statistics (the tool runs
    offline); worker output stays in Ray's logs so `--json` keeps stdout clean.
    """
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        if options.address:
            kwargs["address"] = options.address
        else:
            kwargs["include_dashboard"] = False
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = options.address or "a new local instance"
            raise ReasonEditError(f"cannot start Ray ({where}): {_first_line(exc)}") from None
        started = True
    _quiet_ray_data()
    # Ray Data logs a worker's failure with its traceback; the CLI says it in one line
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    data_log.setLevel(logging.CRITICAL)
    try:
        yield ray
    finally:
        data_log.setLevel(level)
        if started:
            ray.shutdown()


def _quiet_ray_data() -> None:
    """No Ray Data progress bars or stats logs: the CLI draws its own progress."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    for name, value in (
        ("enable_progress_bars", False),
        ("enable_operator_progress_bars", False),
        ("print_on_execution_start", False),
        ("enable_auto_log_stats", False),
        ("verbose_stats_logs", False),
    ):
        if hasattr(ctx, name):
            setattr(ctx, name, value)


def worker_count(ray: Any, options: RayOptions, tasks: int) -> int:
    """How many workers to start: as asked, else what the cluster holds; at most `tasks`."""
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    if options.gpus_per_worker > 0 and gpus <= 0:
        raise UsageError("`gpus_per_worker` was given but the Ray cluster has no GPUs")
    if options.workers:
        n = options.workers
    elif options.gpus_per_worker > 0:
        n = int(gpus // options.gpus_per_worker)
    else:
        n = int(cpus // options.cpus_per_worker)
    n = max(1, min(n, tasks))
    need_cpu, need_gpu = n * options.cpus_per_worker, n * options.gpus_per_worker
    if need_cpu > cpus or need_gpu > gpus + 1e-9:
        # a pool that can never start would wait forever
        raise UsageError(
            f"{n} workers need {need_cpu:g} CPUs and {need_gpu:g} GPUs; the Ray cluster has "
            f"{cpus:g} CPUs and {gpus:g} GPUs (lower `workers` or `gpus_per_worker`)"
        )
    return n


# ----------------------------------------------------------------- add-edit
def worker_settings(
    editor: Editor, *, patches: str, top_k_patches: int, w: float | None
) -> dict[str, Any]:
    """What a worker needs to compute keys exactly as `editor` would (plain JSON)."""
    from reasonedit_cli.edits import max_image_pixels
    from reasonedit_cli.embedding import DEFAULT_LAYER
    from reasonedit_cli.presets import hook_layer

    return {
        "preset": editor.preset.name,
        "model": editor.model_name,
        "text_model": editor.text_model_name,
        "device": editor.device,
        "dtype": editor.dtype,
        "trust_remote_code": editor.trust_remote_code,
        "layer": editor.config.get("layer") or hook_layer(DEFAULT_LAYER, editor.preset),
        "w": w,
        "patches": patches,
        "top_k_patches": top_k_patches,
        # the driver's --max-image-pixels: workers decode the images in their own process
        "max_image_pixels": max_image_pixels(),
    }


def start_worker(settings: dict[str, Any]) -> None:
    """What a worker process sets up before it loads a model: quiet libraries and the
    driver's image pixel limit (a worker is another process, which would otherwise decode
    with the default limit)."""
    from reasonedit_cli.edits import set_max_image_pixels

    _quiet_worker()
    set_max_image_pixels(settings.get("max_image_pixels"))


class EditBatchWorker:
    """A Ray Data actor: loads the VLM and the text encoder once, then computes batches.

    Each input row is one batch of edits; the output row says which staged files hold
    its edits and keys, with their checksums, and the model facts the keys were made with.
    """

    def __init__(self, settings: dict[str, Any], staging: str, fail_batch: int | None = None):
        start_worker(settings)
        from reasonedit_cli.editor import Editor

        self.settings = settings
        self.staging = staging
        self.fail_batch = fail_batch  # tests: a worker that crashes on this batch
        self.editor = Editor(
            None,
            model=settings["model"],
            text_model=settings["text_model"],
            device=settings["device"],
            dtype=settings["dtype"],
            trust_remote_code=settings["trust_remote_code"],
            preset=settings.get("preset"),
        )
        self.editor.use_embedding(settings["layer"], settings["w"])  # loads both models

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa
        import torch

        # Ray Data calls this from a thread of its own, and grad mode is per thread
        torch.set_grad_enabled(False)
        return pa.Table.from_pylist([self.compute(row) for row in batch.to_pylist()])

    def compute(self, row: dict[str, Any]) -> dict[str, Any]:
        from reasonedit_cli.staging import staged_segment_bytes, write_staged_file

        index = int(row["batch"])
        if index == self.fail_batch:
            raise RuntimeError(f"injected failure on batch {index}")
        t0 = time.perf_counter()
        edits = edits_from_row(row)
        records, keys = self.editor.edit_records(
            edits,
            patches=self.settings["patches"],
            top_k_patches=self.settings["top_k_patches"],
        )
        dim = int(keys[0].vector.shape[0])
        out: dict[str, Any] = {"batch": index, "dim": dim}
        for kind, data in (
            ("edits", staged_segment_bytes("edits", records)),
            ("keys", staged_segment_bytes("keys", keys, dim)),
        ):
            name = f"{kind}-{index:06d}.parquet"
            write_staged_file(self.staging, name, data)
            out |= {
                f"{kind}_file": name,
                f"{kind}_sha256": _sha256(data),
                f"{kind}_rows": len(records) if kind == "edits" else len(keys),
            }
        out["facts"] = json.dumps(self.editor.model_facts())
        out["host"] = socket.gethostname()
        out["seconds"] = round(time.perf_counter() - t0, 3)
        return out


def edits_to_row(index: int, edits: Sequence[Edit]) -> dict[str, Any]:
    """One batch of parsed edits as a Ray Data row (JSON fields plus the image bytes)."""
    fields = [
        {
            "id": e.id,
            "image_path": str(e.image_path),
            "question": e.question,
            "answer": e.answer,
            "reasoning": list(e.reasoning),
            "boxes": e.boxes,
            "source": e.source,
            "image_ext": e.image_ext,
            "where": e.where,
        }
        for e in edits
    ]
    return {"batch": index, "edits": json.dumps(fields), "images": [e.image_bytes for e in edits]}


def edits_from_row(row: dict[str, Any]) -> list[Edit]:
    """The inverse of `edits_to_row`, on a worker."""
    from reasonedit_cli.edits import Edit

    return [
        Edit(
            image_path=Path(f["image_path"]),
            question=f["question"],
            answer=f["answer"],
            reasoning=list(f["reasoning"]),
            boxes=f["boxes"],
            id=f["id"],
            source=f["source"],
            image_bytes=bytes(data),
            image_ext=f["image_ext"],
            where=f["where"],
        )
        for f, data in zip(json.loads(row["edits"]), row["images"])
    ]


def add_edits_ray(
    editor: Editor,
    edits: Sequence[Edit],
    *,
    options: RayOptions,
    batch_size: int = 16,
    patches: str = "auto",
    top_k_patches: int = 1,
    progress: Callable[[int], None] | None = None,
    merge: bool = False,
    fail_batch: int | None = None,
    replace: bool = False,
) -> AddReport:
    """`Editor.add_edits` with the compute on Ray workers; the same keys, values and report.

    `merge` merges the new keys on insert, as the local engine does (the committer runs
    it). `fail_batch` makes the worker computing that batch raise (crash tests).
    """
    from reasonedit_cli.staging import StagingJob

    report, todo = editor.plan_add(edits, progress, replace=replace)
    if not todo:
        return report
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    cb = editor.require_codebook()
    w = editor.config.get("w")
    if w is None:
        w = editor.preset.uncalibrated_w  # None: auto, from the first batch
    with ray_session(options) as ray, StagingJob(cb.path) as job:
        results: list[dict[str, Any]] = []
        rest = list(enumerate(batches))
        if w is None:
            # auto w comes from the first batch (as in the local engine): compute it
            # first, then give every worker that w
            settings = worker_settings(editor, patches=patches, top_k_patches=top_k_patches, w=None)
            n = worker_count(ray, options, 1)
            results += _run_batches(ray, job, rest[:1], settings, options, n, progress, fail_batch)
            w = json.loads(results[0]["facts"])["w"]
            rest = rest[1:]
        if rest:
            settings = worker_settings(editor, patches=patches, top_k_patches=top_k_patches, w=w)
            n = worker_count(ray, options, len(rest))
            results += _run_batches(ray, job, rest, settings, options, n, progress, fail_batch)
        edit_records, key_records, facts = _verified_records(editor, job, batches, results, w)
        editor.check_model_revision(facts["model_revision"])
        config = editor.config_for_manifest(facts)
        return editor.commit_records(todo, edit_records, key_records, config, report, merge=merge)


def _run_batches(
    ray: Any,
    job: Any,
    batches: list[tuple[int, list[Edit]]],
    settings: dict[str, Any],
    options: RayOptions,
    workers: int,
    progress: Callable[[int], None] | None,
    fail_batch: int | None,
) -> list[dict[str, Any]]:
    """One Ray Data pass: a row per batch through an actor pool; rows of staged files."""
    import ray.data as ray_data

    sizes = {i: len(b) for i, b in batches}
    ds = ray_data.from_items(
        [edits_to_row(i, b) for i, b in batches], override_num_blocks=len(batches)
    )
    ds = ds.map_batches(
        EditBatchWorker,
        fn_constructor_kwargs={
            "settings": settings,
            "staging": str(job.dir),
            "fail_batch": fail_batch,
        },
        batch_size=1,
        batch_format="pyarrow",
        compute=ray_data.ActorPoolStrategy(size=workers),
        num_cpus=options.cpus_per_worker,
        num_gpus=options.gpus_per_worker or None,
    )
    out = []
    error: ReasonEditError | None = None
    rows = iter(ds.iter_rows())
    try:
        for row in rows:
            out.append(dict(row))
            if progress:
                progress(sizes[int(row["batch"])])
    except (ReasonEditError, KeyboardInterrupt):
        raise
    except Exception as exc:  # Ray wraps worker failures in its own exception types
        error = _job_error(exc)  # raised below, NOT chained: see the finally clause
    finally:
        # The execution (and its actors, holding CPUs/GPUs and a model each) lives as
        # long as anything references it, including the frames of a Ray exception's
        # traceback: close the iterator, drop every reference, collect.
        close = getattr(rows, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()
        del rows, ds
        gc.collect()
    if error is not None:
        raise error
    return out


def _verified_records(
    editor: Editor,
    job: Any,
    batches: list[list[Edit]],
    results: list[dict[str, Any]],
    w: float | None,
) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Check every batch's staged files against what was sent; the records, in order.

    Refuses the job (nothing is committed) when a batch is missing, a file is missing or
    damaged, a batch holds other edits or keys than its own, or the workers disagree on
    the model or the embedding settings.
    """
    from reasonedit_cli.staging import read_staged_segment

    cb = editor.require_codebook()
    by_batch = {int(r["batch"]): r for r in results}  # a retried batch: its last output
    missing = [i for i in range(len(batches)) if i not in by_batch]
    if missing:
        raise _refused(f"no output for batch(es) {missing[:5]}")
    facts_seen = {r["facts"] for r in by_batch.values()}
    dims = {int(r["dim"]) for r in by_batch.values()}
    if len(facts_seen) != 1 or len(dims) != 1:
        raise _refused(f"workers used different models or settings: {sorted(facts_seen)}")
    facts = json.loads(facts_seen.pop())
    (dim,) = dims
    if w is not None and facts["w"] != w:
        raise _refused(f"workers embedded with w={facts['w']}, expected {w}")
    edit_records: list[Any] = []
    key_records: list[Any] = []
    for i, batch in enumerate(batches):
        r = by_batch[i]
        staged = {}
        for kind in ("edits", "keys"):
            rel = job.rel(r[f"{kind}_file"])
            if not (cb.path / rel).exists():
                raise _refused(
                    f"{rel}, written on host {r['host']}, is not visible here: the codebook "
                    "must be on storage every Ray node mounts at the same path"
                )
            entry = {
                "kind": kind,
                "path": rel,
                "sha256": r[f"{kind}_sha256"],
                "rows": int(r[f"{kind}_rows"]),
            }
            try:
                staged[kind] = read_staged_segment(cb, entry, dim)
            except ReasonEditError as exc:
                raise _refused(str(exc)) from None
        _check_batch(i, batch, staged["edits"], staged["keys"])
        edit_records += staged["edits"]
        key_records += staged["keys"]
    return edit_records, key_records, facts


def _check_batch(index: int, batch: Sequence[Edit], records: list[Any], keys: list[Any]) -> None:
    """A batch's output holds its edits in order, each with its answer and sentence keys."""
    want = [(e.id, e.image_sha256) for e in batch]
    got = [(r.edit_id, r.image_sha256) for r in records]
    if got != want:
        raise _refused(f"batch {index} holds other edits than it was given")
    ids = {e.id for e in batch}
    if any(k.edit_id not in ids for k in keys):
        raise _refused(f"batch {index} holds keys of edits it was not given")
    for e in batch:
        own = [k for k in keys if k.edit_id == e.id]
        sentences = [k.key_text for k in own if k.kind == "sentence"]
        if sum(k.kind == "answer" for k in own) != 1 or sentences != list(e.reasoning):
            raise _refused(f"batch {index}: the keys of edit {e.id} are incomplete")


def _refused(why: str) -> ReasonEditError:
    return ReasonEditError(f"Ray job output refused ({why}); the codebook is unchanged")


def _job_error(exc: BaseException) -> ReasonEditError:
    """The user-facing error of a failed Ray job: the worker's own exception, in one line.

    Ray wraps a worker's exception (Ray Data twice: UserCodeException in RayTaskError)
    and may only keep it as traceback text, so the original is found in that text too.
    A worker's ReasonEditError comes back as itself (same message and exit code).
    """
    from reasonedit_cli import errors

    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ReasonEditError) and not type(e).__name__.startswith("RayTaskError"):
            return type(e)(str(e))
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    for name, message in _ERROR_LINE.findall(str(exc)):
        if name in _RAY_WRAPPERS:
            continue
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, ReasonEditError):
            return cls(message)
        return ReasonEditError(f"a Ray worker failed: {name}: {message}; the codebook is unchanged")
    return ReasonEditError(f"the Ray job failed: {_first_line(exc)}; the codebook is unchanged")


_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(\w+): (.+)$", re.M)
_RAY_WRAPPERS = {"UserCodeException", "RayTaskError", "RayActorError", "ActorDiedError"}


# ----------------------------------------------------------------- evaluate
class VLMWorker:
    """A long-lived Ray actor holding one VLM; `RemoteVLM` sends it batches of calls."""

    def __init__(self, model: str, device: str, dtype: str, trust_remote_code: bool) -> None:
        _quiet_worker()
        from reasonedit_cli.vlm import VLM

        self.vlm = VLM(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)

    def info(self) -> dict[str, Any]:
        v = self.vlm
        return {"revision": v.revision, "family": v.family, "layers": v.candidate_layers()}

    def call(self, method: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        import torch

        if method not in REMOTE_METHODS:
            raise ValueError(f"not a remote VLM method: {method}")
        torch.set_grad_enabled(False)  # per thread; the actor may not call from its first
        return getattr(self.vlm, method)(*args, **kwargs)


class RemoteVLM:
    """A `backend.VLMBackend` computed by a pool of `VLMWorker` actors.

    It has every method of the protocol (not `CompletingBackend`'s sampling and
    streaming: `evaluate` answers greedily).

    Batched methods are cut at multiples of the caller's `batch_size`, so each worker
    runs exactly the forward batches the local VLM would (same padding, same results).
    """

    def __init__(self, name: str, actors: list[Any], info: dict[str, Any]) -> None:
        from ray.util import ActorPool

        self.name = name
        self.revision = info["revision"]
        self.family = info["family"]
        self._layers = list(info["layers"])
        self._pool = ActorPool(actors)
        self.workers = len(actors)
        self.forward_calls = 0  # counted by the workers; kept for interface parity

    def candidate_layers(self) -> list[LayerInfo]:
        return list(self._layers)

    def resolve_layer(self, layer: str) -> LayerInfo:
        from reasonedit_cli.vlm import VLM

        # VLM's resolution reads candidate_layers() only, which this class has
        return VLM.resolve_layer(cast(Any, self), layer)

    def generate(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 16,
        batch_size: int = 16,
    ) -> list[str]:
        kw = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
        parts = self._spread("generate", batch_size, (images, prompts), kw)
        return [a for part in parts for a in part]

    def pooled_inputs(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        layers: Sequence[str],
        *,
        batch_size: int = 16,
    ) -> dict[str, Any]:
        import numpy as np

        kw = {"layers": list(layers), "batch_size": batch_size}
        parts = self._spread("pooled_inputs", batch_size, (images, prompts), kw)
        return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}

    def yes_probability(
        self, images: Sequence[Any], prompts: Sequence[str], *, batch_size: int = 16
    ) -> Any:
        import numpy as np

        parts = self._spread("yes_probability", batch_size, (images, prompts), {})
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def answer_loss(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        answers: Sequence[str],
        *,
        batch_size: int = 16,
    ) -> Any:
        import numpy as np

        kw = {"batch_size": batch_size}
        parts = self._spread("answer_loss", batch_size, (images, prompts, answers), kw)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def _spread(
        self, method: str, batch_size: int, seqs: tuple[Sequence[Any], ...], kwargs: dict
    ) -> list[Any]:
        """Run `method` on pieces of one batch each, over all workers; results in order."""
        n = len(seqs[0])
        starts = range(0, n, batch_size) if n else [0]  # an empty call still gets an answer
        pieces = [tuple(list(s[i : i + batch_size]) for s in seqs) for i in starts]
        kwargs = {**kwargs, "batch_size": batch_size}
        try:
            return list(
                self._pool.map(lambda actor, args: actor.call.remote(method, args, kwargs), pieces)
            )
        except (ReasonEditError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise _job_error(exc) from None


@contextlib.contextmanager
def remote_vlm(editor: Editor, options: RayOptions) -> Iterator[RemoteVLM]:
    """Start VLM workers for `editor`'s model, attach them as its VLM; stop them after."""
    from reasonedit_cli.vlm import model_path

    with ray_session(options) as ray:
        n = worker_count(ray, options, tasks=1 << 30)
        path = model_path(editor.model_name)
        actor_cls = ray.remote(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker)(
            VLMWorker
        )
        actors = [
            actor_cls.remote(path, editor.device, editor.dtype, editor.trust_remote_code)
            for _ in range(n)
        ]
        try:
            try:
                infos = ray.get([a.info.remote() for a in actors])
            except Exception as exc:
                raise _job_error(exc) from None
            vlm = RemoteVLM(editor.model_name, actors, infos[0])
            editor.attach_vlm(vlm)
            yield vlm
        finally:
            for a in actors:
                with contextlib.suppress(Exception):
                    ray.kill(a)


# ------------------------------------------------------------------ helpers
def _quiet_worker() -> None:
    """Worker processes: no tokenizer threads, no hub progress bars or chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
