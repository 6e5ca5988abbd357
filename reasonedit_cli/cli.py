"""The `reasonedit` command line: parse options, call the core, render the result.

No method logic lives here. Every command takes `--json` (machine-readable stdout) and
exits 0 on success, 1 on an expected failure (one line on stderr, no traceback) and 2 on
a usage error. Heavy libraries are imported inside commands so `--help` stays instant.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from typer.main import get_current_context

from reasonedit_cli import __version__
from reasonedit_cli import cli_support as cs
from reasonedit_cli.errors import InputError, ReasonEditError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from reasonedit_cli.editor import AddReport

app = typer.Typer(
    name="reasonedit",
    help=(
        "Correct vision-language models with human reasoning, without retraining.\n\n"
        "Add edits (image, question, answer, reasoning) to a codebook; `ask` retrieves the "
        "relevant reasoning facts and prepends them to the model's prompt."
    ),
    no_args_is_help=True,
    add_completion=False,
    cls=cs.Group,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

F = TypeVar("F", bound=Callable[..., Any])

# ----------------------------------------------------------------- options
CodebookOpt = Annotated[
    Path,
    typer.Option(
        "--codebook",
        "-c",
        envvar="REASONEDIT_CODEBOOK",
        callback=cs.inherit_codebook,
        help="Codebook directory (env REASONEDIT_CODEBOOK; may also go before the command).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        callback=cs.verbose,
        help="Show the model libraries' log messages and warnings on stderr.",
    ),
]
MaxPixelsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-image-pixels",
        min=1,
        envvar="REASONEDIT_MAX_IMAGE_PIXELS",
        callback=cs.max_image_pixels,
        show_default=False,
        help="Refuse images with more pixels than this, before decoding (default 250 MP; "
        "env REASONEDIT_MAX_IMAGE_PIXELS). Large images are decoded reduced.",
    ),
]
LockOpt = Annotated[
    float, typer.Option("--lock-timeout", help="Seconds to wait for another writer to finish.")
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="REASONEDIT_API_KEY",
        help="API key of the server (Authorization: Bearer KEY; env REASONEDIT_API_KEY).",
    ),
]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset",
        help="default: reasonedit's choices; reference: the authors' code (docs/reference.md). "
        "Stored in the codebook (ask follows it); default: the codebook's, else default.",
    ),
]
DEFAULT_CODEBOOK = Path("codebook")
#: --no-objects of the commands that retrieve (ask, serve)
NO_OBJECTS_QUERY_HELP = "Query only the whole-image keys, not the codebook's object index."


def _check_preset(preset: str | None) -> None:
    """A usage error (exit 2) for an unknown --preset, before any model loads."""
    from reasonedit_cli.presets import get_preset

    get_preset(preset)


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _stdout():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _table_out():
    """stdout for tables: on a terminal its width; piped, wide enough that no cell (a full
    timestamp, a long question) is cut or wrapped."""
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 100_000)


def handle_errors(func: F) -> F:
    """Turn expected failures into one line on stderr and a meaningful exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ReasonEditError as exc:
            # library messages name parameters (`text_model`); the CLI says its flags
            message = cs.in_cli_words(str(exc), get_current_context(silent=True))
            message = message.replace("\n", " ")
            typer.echo(f"Error: {message}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted; the codebook is unchanged.", err=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            raise typer.Exit(0) from None

    return wrapper  # type: ignore[return-value]


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


@contextmanager
def _progress(total: int, label: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar with an ETA on stderr, shown only when stderr is a terminal;
    a no-op callback when disabled."""
    if not enabled or total <= 1 or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=_stderr(),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"reasonedit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=version_callback, is_eager=True, help="Show the version."
        ),
    ] = False,
    codebook: Annotated[
        Path | None,
        typer.Option(
            "--codebook",
            "-c",
            callback=cs.global_codebook,
            help="Codebook directory for the command that follows (as if given after it).",
        ),
    ] = None,
) -> None:
    """Correct vision-language models with human reasoning, without retraining."""


# ---------------------------------------------------------------- add-edit
@app.command("add-edit")
@handle_errors
@cs.model_options
@cs.ray_options
def add_edit(
    image: Annotated[Path | None, cs.option("image", "Image of the edit.")] = None,
    question: Annotated[str | None, cs.option("question", "The question.")] = None,
    answer: Annotated[
        str | None,
        typer.Option("--answer", "-a", callback=cs.text_value, help="The correct answer."),
    ] = None,
    reason: Annotated[
        list[str] | None,
        typer.Option(
            "--reason",
            "-r",
            callback=cs.reasoning_value,
            help="Reasoning: sentences that say why the answer is right (repeat the flag or "
            "write several); not empty, not a placeholder such as '...' or TODO.",
        ),
    ] = None,
    box: Annotated[
        list[str] | None,
        typer.Option("--box", help="x0,y0,x1,y1 (or 'none') per reasoning sentence, in order."),
    ] = None,
    edit_id: Annotated[
        str | None, typer.Option("--id", help="Edit id (default: a content hash).")
    ] = None,
    from_file: Annotated[
        str | None, cs.option("from", "Edits from a file: JSONL path, or - for stdin.")
    ] = None,
    fmt: Annotated[
        str, cs.option("format", "Layout of --from: jsonl | aokvqa | rationalevqa")
    ] = "jsonl",
    images_root: Annotated[
        Path | None, cs.option("images_root", "Image folder for aokvqa / rationalevqa.")
    ] = None,
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="Add the valid records and report the others.")
    ] = False,
    batch_size: Annotated[int, cs.option("batch_size", "Edits per VLM batch.")] = 16,
    patches: Annotated[
        str, typer.Option("--patches", help="auto: search evidence crops; none: whole image only.")
    ] = "auto",
    top_k_patches: Annotated[
        int, typer.Option("--top-k-patches", min=0, help="Lowest-loss crops kept per sentence.")
    ] = 1,
    merge: Annotated[
        bool | None,
        typer.Option(
            "--merge/--no-merge",
            help="Merge the new keys into existing ones (merge on insert); "
            "default: on with --preset reference, else off.",
        ),
    ] = None,
    preset: PresetOpt = None,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="An id already stored with other content: replace that edit (one new "
            "version; undo with restore). Without it that is an error.",
        ),
    ] = False,
    no_objects: Annotated[
        bool,
        cs.option(
            "no_objects",
            "Write no object-index keys for these edits (by default an edit whose "
            "reasoning names a region, e.g. 'in the top left', gets one: the same object "
            "in other images).",
        ),
    ] = False,
    codebook: CodebookOpt = DEFAULT_CODEBOOK,
    models: cs.ModelOptions = cs.ModelOptions(),
    verbose: VerboseOpt = False,
    max_image_pixels: MaxPixelsOpt = None,
    lock_timeout: LockOpt = 10.0,
    ray: cs.RayFlags = cs.RayFlags(),
    as_json: JsonOpt = False,
) -> None:
    """Add edits to the codebook: from flags, or many from JSONL (idempotent).

    Example: reasonedit add-edit -i cat.png -q "what shape is in the image?" -a circle
    -r "The shape has no corners. A shape with no corners is a circle."
    """
    from reasonedit_cli import edits as edits_mod
    from reasonedit_cli.editor import PATCH_MODES

    if patches not in PATCH_MODES:
        raise UsageError(f"--patches must be one of {', '.join(PATCH_MODES)}")
    _check_preset(preset)
    ray_options = ray.options()
    errors: list[str] = []
    if from_file is not None:
        if any(v is not None for v in (image, question, answer, reason, box, edit_id)):
            raise UsageError(
                "--from cannot be combined with --image/--question/--answer/--reason/--box/--id"
            )
        from reasonedit_cli.datasets import read_edits

        edits, errors = read_edits(
            from_file, fmt, images_root=images_root, skip_invalid=skip_invalid
        )
    else:
        missing = [
            n
            for n, v in (
                ("--image", image),
                ("--question", question),
                ("--answer", answer),
                ("--reason", reason),
            )
            if not v
        ]
        if missing:
            raise UsageError(f"missing {', '.join(missing)} (or use --from FILE)")
        record: dict[str, Any] = {
            "image": str(image),
            "question": question,
            "answer": answer,
            "reasoning": list(reason or []),
        }
        if edit_id:
            record["id"] = edit_id
        if box:
            record["boxes"] = [_parse_box_flag(b) for b in box]
        edits = [edits_mod.edit_from_record(record, Path.cwd(), "command line", "cli")]
    if not edits:
        if errors:
            raise InputError(f"no valid edits ({len(errors)} invalid); first: {errors[0]}")
        raise InputError(f"{from_file}: no edits found")
    editor = models.editor(
        codebook, create=True, lock_timeout=lock_timeout, preset=preset, objects=not no_objects
    )
    if merge is None:
        merge = editor.preset.merge_on_insert
    add: Callable[..., AddReport] = editor.add_edits
    if ray_options is not None:
        from reasonedit_cli.distributed import add_edits_ray

        # workers compute the keys, this process verifies and commits them
        add = functools.partial(add_edits_ray, editor, options=ray_options)
    with _progress(len(edits), "Adding edits", not as_json) as advance:
        report = add(
            edits,
            batch_size=batch_size,
            progress=advance,
            patches=patches,
            top_k_patches=top_k_patches,
            merge=merge,
            replace=replace,
        )
    merged = report.merge.summary() if report.merge is not None else None
    if as_json:
        _print_json(
            {
                "added": report.added,
                "skipped": report.skipped,
                "replaced": report.replaced,
                "invalid": errors,
                "keys": report.keys,
                "version": report.version,
                "codebook": str(codebook),
                "boxes": report.boxes,
                "merged": merged,
                "object_keys": report.object_keys,
                "objects_problem": report.objects_problem,
            }
        )
    else:
        out = _stdout()
        replaced = f" ({len(report.replaced)} replaced)" if report.replaced else ""
        out.print(
            f"Added {len(report.added)} edit(s){replaced} ({report.keys} keys) to {codebook}; "
            f"{len(report.skipped)} already present; version {report.version}.",
            markup=False,
        )
        if report.added:
            out.print("Added: " + ", ".join(report.added), markup=False)
        if report.replaced:
            out.print("Replaced: " + ", ".join(report.replaced), markup=False)
        if merged:
            out.print(
                f"Merged keys: {merged['before']} -> {merged['after']} "
                f"({merged['values_collected']} value(s) collected)."
            )
        if report.object_keys:
            out.print(
                f"Object index: {report.object_keys} key(s) for edits whose reasoning "
                "names a region."
            )
        if report.objects_problem:
            _stderr().print(f"warning: object index not written: {report.objects_problem}")
        for err in errors:
            _stderr().print(f"skipped invalid record: {err}", markup=False)
    if errors:
        raise typer.Exit(1)


def _parse_box_flag(text: str) -> list[float] | None:
    if text.strip().lower() in ("none", "null", "-"):
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--box {text!r}: expected x0,y0,x1,y1 or none") from None


# --------------------------------------------------------------------- ask
@app.command()
@handle_errors
@cs.model_options
def ask(
    image: Annotated[Path | None, cs.option("image", "Image to ask about.")] = None,
    question: Annotated[str | None, cs.option("question", "The question.")] = None,
    from_file: Annotated[
        str | None,
        cs.option("from", "Questions from JSONL ({image, question[, id]}), - for stdin."),
    ] = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="Show retrieved facts, distances and patches.")
    ] = False,
    no_edit: Annotated[
        bool, typer.Option("--no-edit", help="Answer with the unedited model.")
    ] = False,
    top_k: Annotated[
        int | None, typer.Option("--top-k", min=1, help="Keys to retrieve (default 5).")
    ] = None,
    percentile: Annotated[
        float | None, cs.option("percentile", "Rejection percentile p (default: codebook's).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 16,
    batch_size: Annotated[int, cs.option("batch_size")] = 16,
    no_objects: Annotated[bool, cs.option("no_objects", NO_OBJECTS_QUERY_HELP)] = False,
    codebook: CodebookOpt = DEFAULT_CODEBOOK,
    models: cs.ModelOptions = cs.ModelOptions(),
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            help="Ask a running `reasonedit serve` at this URL (its model and codebook) "
            "instead of loading the model here.",
        ),
    ] = None,
    api_key: ApiKeyOpt = None,
    verbose: VerboseOpt = False,
    max_image_pixels: MaxPixelsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer a question about an image with the edited model.

    Example: reasonedit ask -i photo.png -q "what color is the shape?" --explain
    """
    from reasonedit_cli.datasets import read_questions
    from reasonedit_cli.edits import read_image_file

    if server is not None:
        from reasonedit_cli.client import check_url

        check_url(server)
        local = models.given() + (["--no-objects"] if no_objects else [])
        if local:
            verb = "applies" if len(local) == 1 else "apply"
            raise UsageError(f"{', '.join(local)} {verb} to the server, not to ask --server")
    if from_file is not None:
        if image is not None or question is not None:
            raise UsageError("--from cannot be combined with --image/--question")
        items = read_questions(from_file)
    else:
        if image is None or not question:
            raise UsageError("give --image and --question (or --from FILE)")
        from reasonedit_cli.edits import clean_words

        question = clean_words(question, "question", "--question")
        data, _, img = read_image_file(image, "--image")
        items = [{"image_bytes": data, "image": img, "question": question, "where": "command line"}]
    if server is not None:
        from reasonedit_cli.client import ask_server

        records = ask_server(
            server,
            items,
            no_edit=no_edit,
            top_k=top_k,
            percentile=percentile,
            max_new_tokens=max_new_tokens,
            api_key=api_key,
        )
        _print_answers(items, records, as_json, explain)
        return
    images = [it["image"] for it in items]
    # --no-edit needs no codebook; one that exists still names the model
    use_codebook = None if no_edit and not Path(codebook).exists() else codebook
    editor = models.editor(use_codebook, objects=not no_objects)
    questions = [it["question"] for it in items]
    answers = []
    # one batch at a time, so that a long --from run shows its progress (on a terminal)
    with _progress(len(items), "Asking", True) as advance:
        for start in range(0, len(items), batch_size):
            answers += editor.ask(
                images[start : start + batch_size],
                questions[start : start + batch_size],
                no_edit=no_edit,
                k=top_k,
                percentile=percentile,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
            advance(len(answers) - start)
    _print_answers(items, [ans.to_dict() for ans in answers], as_json, explain)


def _print_answers(
    items: list[dict[str, Any]], records: list[dict[str, Any]], as_json: bool, explain: bool
) -> None:
    """Each answer record, under its question's `id` when the question had one."""
    for it, record in zip(items, records):
        if "id" in it:
            record = {"id": it["id"], **record}
        if as_json:
            _print_json(record)
        else:
            _render_answer(record, explain)


def _render_answer(record: dict[str, Any], explain: bool) -> None:
    out = _stdout()
    if not explain:
        out.print(record["answer"], markup=False)
        return
    from rich.table import Table

    out.print(f"[bold]Q:[/bold] {_esc(record['question'])}")
    out.print(f"[bold]A:[/bold] {_esc(record['answer'])}")
    if not record["searched"]:
        out.print("[dim]unedited model (--no-edit)[/dim]")
        return
    if record["rejected"]:
        near = record["nearest_distance"]
        tau = record["threshold"]
        detail = f" (nearest {near:.3f} > threshold {tau:.3f})" if near is not None and tau else ""
        out.print(f"[dim]no edit applies{detail}; the model ran unedited[/dim]")
        return
    objects = record.get("object_index")
    if objects is not None:
        if objects["problem"]:
            out.print(f"[dim]object index skipped: {_esc(objects['problem'])}[/dim]")
        elif objects["facts"]:
            out.print(
                f"[dim]object index: {len(objects['facts'])} fact(s) only it found "
                f"(edits {_esc(', '.join(objects['edit_ids']))})[/dim]"
            )
    table = Table(title="Retrieved keys", show_lines=False)
    for col in ("distance", "kind", "edit", "box", "fact"):
        table.add_column(col)
    for hit in record["retrieved"]:
        # a merged key holds several facts: one line each, with the edit it came from
        entries = list(dict.fromkeys((e["value"], e["edit_id"]) for e in hit["entries"]))
        table.add_row(
            f"{hit['distance']:.3f}",
            hit["kind"],
            "\n".join(e for _, e in entries),
            "" if hit["box"] is None else ",".join(map(str, hit["box"])),
            "\n".join(_esc(v) for v, _ in entries),
        )
    out.print(table)
    out.print(f"[bold]Prompt:[/bold] {_esc(record['prompt'])}")


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# --------------------------------------------------------------- calibrate
@app.command()
@handle_errors
@cs.model_options
def calibrate(
    pairs: Annotated[
        str | None,
        cs.option(
            "from", "Calibration pairs from JSONL ({image, text}); default: the codebook's edits."
        ),
    ] = None,
    pairs_alias: Annotated[str | None, typer.Option("--pairs", hidden=True)] = None,
    layer_rule: Annotated[
        str, typer.Option("--layer-rule", help="bimodal (paper) | harmonic (published code)")
    ] = "bimodal",
    layers: Annotated[
        list[str] | None, typer.Option("--layer", help="Candidate layer (repeat); default: all.")
    ] = None,
    max_pairs: Annotated[
        int, typer.Option("--max-pairs", min=4, help="Cap on calibration pairs.")
    ] = 400,
    bootstrap: Annotated[
        int | None,
        typer.Option(
            "--bootstrap",
            min=0,
            help="Bootstrap resamples (default 5; with --preset reference: runs, default 10).",
        ),
    ] = None,
    knn: Annotated[
        int | None, typer.Option("--knn", min=1, help="Mutual-kNN sparsification (e.g. 10).")
    ] = None,
    seed: Annotated[int, cs.option("seed")] = 0,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG of modularity curves.")
    ] = None,
    dry_run: Annotated[bool, cs.option("dry_run", "Report only; change nothing.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Commit even when the new settings retrieve fewer of the own edits."
        ),
    ] = False,
    select: Annotated[
        str,
        typer.Option(
            "--select",
            help="checked: the best-balanced (layer, w) that retrieves the own edits as well "
            "as now | balance: the balance score alone (the paper).",
        ),
    ] = "checked",
    max_checks: Annotated[
        int,
        typer.Option("--max-checks", min=1, help="Candidates --select checked may try."),
    ] = 40,
    preset: PresetOpt = None,
    codebook: CodebookOpt = DEFAULT_CODEBOOK,
    models: cs.ModelOptions = cs.ModelOptions(),
    verbose: VerboseOpt = False,
    max_image_pixels: MaxPixelsOpt = None,
    lock_timeout: LockOpt = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Choose the layer and w by topology-balanced calibration; re-embed every key.

    Before committing, the codebook's own edits are asked back (as is, rephrased, on a
    perturbed image) under the old and the new settings. With --select checked (the
    default) that check is part of the choice: the layers in the order of the rule, and
    on each the best-balanced w that retrieves as many as now. A choice that retrieves
    fewer is refused (exit 1, codebook unchanged) unless --force.

    Example: reasonedit calibrate --max-pairs 200 --plot calibration.png
    """
    from reasonedit_cli.calibration import (
        RULES,
        SELECTIONS,
        calibration_steps,
        plot_calibration,
    )

    pairs = cs.one_of_aliases(pairs, pairs_alias, "--from", "--pairs")

    if layer_rule not in RULES:
        raise UsageError(f"--layer-rule must be one of {', '.join(RULES)}")
    if select not in SELECTIONS:
        raise UsageError(f"--select must be one of {', '.join(SELECTIONS)}")
    _check_preset(preset)
    editor = models.editor(codebook, create=True, lock_timeout=lock_timeout, preset=preset)
    reference = editor.preset.calibration == "reference"
    if bootstrap is None:
        from reasonedit_cli.calibration_reference import DEFAULT_N_RUNS

        bootstrap = DEFAULT_N_RUNS if reference else 5
    n_layers = len(layers) if layers else len(editor.vlm.candidate_layers())
    steps = 2 * max(1, bootstrap) if reference else calibration_steps(n_layers)
    from reasonedit_cli.selfcheck import CalibrationRefused

    refused: CalibrationRefused | None = None
    with _progress(steps, "Calibrating", not as_json) as advance:
        try:
            result, version = editor.calibrate(
                pairs,
                rule=layer_rule,
                layers=layers,
                max_pairs=max_pairs,
                bootstrap=bootstrap,
                knn=knn,
                seed=seed,
                progress=lambda _desc, n: advance(n),
                dry_run=dry_run,
                force=force,
                select=select,
                max_checks=max_checks,
            )
        except CalibrationRefused as exc:
            refused, result, version = exc, exc.result, editor.require_codebook().version
    if plot is not None:
        plot_calibration(result, plot)
    summary = result.to_dict() | {
        "version": version,
        "dry_run": dry_run,
        "committed": not dry_run and refused is None,
    }
    if as_json:
        _print_json(summary)
    else:
        _render_calibration(result, summary, version, dry_run, refused is not None)
    if refused is not None:
        raise refused


def _render_calibration(
    result: Any, summary: dict[str, Any], version: int, dry_run: bool, refused: bool
) -> None:
    from rich.table import Table

    out = _stdout()
    table = Table(title=f"Layers ({result.n_pairs} pairs, rule {result.rule})")
    for col in ("layer", "Q_vis", "Q_lang", "Q_bi", "balance"):
        table.add_column(col, justify="right" if col != "layer" else "left")
    for row in summary["layer_table"]:
        mark = " *" if row["layer"] == result.layer else ""
        table.add_row(
            row["layer"] + mark,
            *(_fmt(row.get(k)) for k in ("q_vis", "q_lang", "q_bi", "harmonic")),
        )
    out.print(table)
    rows = summary["w_table"]
    step = max(1, len(rows) // 10)
    shown = rows[::step]
    shown += [r for r in rows if r["w"] == result.w and r not in shown]
    lo, hi = (rows[0].get("w_rel"), rows[-1].get("w_rel")) if rows else (None, None)
    grid = (
        f"{len(rows)} points, {_fmt(lo)}x..{_fmt(hi)}x the layer's equal-spread w"
        if lo is not None
        else f"{len(rows)} points"
    )
    wt = Table(title=f"w on {result.layer} ({grid}; every {step}th shown, and the chosen)")
    for col in ("w", "Q_vis", "Q_lang", "Q_bi", "balance"):
        wt.add_column(col, justify="right")
    for row in shown:
        wt.add_row(
            _fmt(row["w"]), *(_fmt(row.get(k)) for k in ("q_vis", "q_lang", "q_bi", "harmonic"))
        )
    out.print(wt)
    check = summary.get("check")
    if check:
        ct = Table(title="Own edits retrieved (asked back as is, rephrased, on a perturbed image)")
        old, new = check["old_settings"], check["new_settings"]
        ct.add_column("probe")
        ct.add_column(f"now: {old['layer']}, w = {old['w']:.4g}", justify="right")
        ct.add_column(f"chosen: {new['layer']}, w = {new['w']:.4g}", justify="right")
        for kind, c in check["kinds"].items():
            mark = " (lost)" if kind in check["lost"] else ""
            ct.add_row(kind, f"{c['old']}/{c['total']}", f"{c['new']}/{c['total']}{mark}")
        out.print(ct)
    sel = summary.get("selection")
    if sel:
        paper = sel["paper"]
        if (paper["layer"], paper["w"]) != (result.layer, result.w):
            lost: list[str] = next(
                (c["lost"] for t in sel["tried"] for c in t["checks"] if c["w"] == paper["w"]),
                [],
            )
            out.print(
                f"The balance score alone chose {paper['layer']}, w = {paper['w']:.4g}, which "
                f"loses {', '.join(lost) or 'retrieval'}; checked {sel['n_checks']} candidates."
            )
        elif not sel["passed"]:
            out.print(f"No candidate of {sel['n_checks']} checked retrieves the own edits as now.")
    verb = "would choose" if dry_run or refused else "chose"
    out.print(
        f"Calibration {verb} layer [bold]{result.layer}[/bold], w = {result.w:.4g}"
        + ("" if dry_run or refused else f"; codebook version {version}.")
    )


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


# -------------------------------------------------------------- merge-keys
@app.command("merge-keys")
@handle_errors
def merge_keys(
    dry_run: Annotated[bool, cs.option("dry_run", "Report what would merge.")] = False,
    codebook: CodebookOpt = DEFAULT_CODEBOOK,
    lock_timeout: LockOpt = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Consolidate overlapping keys (docs/method.md, merging) and report before/after counts.

    A merged key keeps every distinct value of the keys it absorbed, each with its
    edit, so `remove-edit` later drops just that edit's values.

    Example: reasonedit merge-keys --dry-run
    """
    from reasonedit_cli.editor import Editor

    editor = Editor(codebook, lock_timeout=lock_timeout)
    plan, version = editor.merge_keys(dry_run=dry_run)
    record = {**plan.summary(groups=True), "dry_run": dry_run, "version": version}
    if as_json:
        _print_json(record)
        return
    out = _stdout()
    verb = "would merge" if dry_run else "merged"
    out.print(
        f"Keys: {plan.n_before} -> {plan.n_after} ({verb} {len(plan.merged_into)}); "
        f"{plan.values_collected} value(s) collected, {record['multi_value_keys']} key(s) "
        f"with several values; version {version}."
    )
    if dry_run and record["groups"]:
        from rich.table import Table

        shown = record["groups"][:20]
        table = Table(title=f"Merges ({len(shown)} of {len(record['groups'])} keys)")
        for col in ("key", "absorbed", "edits", "values"):
            table.add_column(col)
        for g in shown:
            table.add_row(
                (g["key_id"] or "")[:12],
                str(g["absorbed"]),
                ", ".join(g["edit_ids"]),
                "\n".join(_esc(v) for v in g["values"]),
            )
        out.print(table)


# ---------------------------------------------------------------- evaluate
@app.command()
@handle_errors
@cs.model_options
@cs.ray_options
def evaluate(
    edits: Annotated[
        str | None,
        cs.option(
            "from", "Edits to apply, from a file (JSONL; --format for A-OKVQA/RationaleVQA)."
        ),
    ] = None,
    edits_alias: Annotated[str | None, typer.Option("--edits", hidden=True)] = None,
    probes: Annotated[
        str | None,
        typer.Option("--probes", help="Probe JSONL ({image, question, answer, kind, edit_id})."),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            help="Build edits and probes from a dataset: easy-vqa, or scenes (generated "
            "multi-object scenes, docs/evaluation.md).",
        ),
    ] = None,
    fmt: Annotated[
        str, cs.option("format", "Layout of --from: jsonl | aokvqa | rationalevqa.")
    ] = "jsonl",
    images_root: Annotated[
        Path | None, cs.option("images_root", "Image folder for --format.")
    ] = None,
    n_edits: Annotated[
        int, typer.Option("--n-edits", min=1, help="Edits to build from --dataset.")
    ] = 100,
    methods: Annotated[
        str,
        typer.Option(
            "--methods",
            help="Comma list of unedited, reasonedit, reasonedit-reference, ike, "
            "ike-reference, grace (trained adaptor), answer-lookup, vision-only, text-only, "
            "no-patches, reasonedit-regions, vision-regions (region keys), reasonedit-objects "
            "(a separate index of region keys), or all.",
        ),
    ] = "all",
    sweep_p: Annotated[
        bool, typer.Option("--sweep-p/--no-sweep-p", help="Rejection percentile sweep 10..90.")
    ] = True,
    sweep_w: Annotated[
        bool, typer.Option("--sweep-w", help="Key weight w sweep (re-embeds keys 5 times).")
    ] = False,
    percentile: Annotated[
        float | None, cs.option("percentile", "Rejection percentile (default 25).")
    ] = None,
    seed: Annotated[int, cs.option("seed", "Seed for sampling edits and probes.")] = 0,
    sequential: Annotated[
        bool, typer.Option("--sequential", help="Also add edits one at a time and track drift.")
    ] = False,
    eval_every: Annotated[
        int, typer.Option("--eval-every", min=1, help="With --sequential: measure every N edits.")
    ] = 10,
    report_dir: Annotated[
        Path | None,
        typer.Option("--report", help="Write metrics.json, metrics.md, sweep.md, sweep.png here."),
    ] = None,
    batch_size: Annotated[int, cs.option("batch_size")] = 16,
    preset: PresetOpt = None,
    codebook: Annotated[
        Path | None,
        typer.Option(
            "--codebook",
            "-c",
            callback=cs.inherit_codebook,
            help="A new directory: keep the run's reasonedit codebook there (written when the "
            "run succeeds). An existing codebook: evaluate with its model and settings "
            "(it is not changed). Default: temporary codebooks only.",
        ),
    ] = None,
    models: cs.ModelOptions = cs.ModelOptions(),
    verbose: VerboseOpt = False,
    max_image_pixels: MaxPixelsOpt = None,
    ray: cs.RayFlags = cs.RayFlags(),
    as_json: JsonOpt = False,
) -> None:
    """Run the protocol: edit, then measure Acc, T/I/R/CoE-Gen and Loc for every method.

    Example: reasonedit evaluate --dataset easy-vqa --n-edits 100 --report report/
    """
    from reasonedit_cli.evaluation import (
        EvaluationInputs,
        EvaluationRun,
        markdown_table,
        parse_methods,
        sweep_markdown,
        write_report,
    )

    edits = cs.one_of_aliases(edits, edits_alias, "--from", "--edits")
    chosen = parse_methods(methods)
    inputs = EvaluationInputs(
        dataset=dataset,
        edits=edits,
        probes=probes,
        fmt=fmt,
        images_root=images_root,
        n_edits=n_edits,
        seed=seed,
    )
    inputs.check()
    _check_preset(preset)
    run = EvaluationRun(
        lambda path: models.editor(path, create=True, preset=preset),
        inputs,
        methods=chosen,
        codebook=codebook,
        batch_size=batch_size,
        sweep_p=sweep_p,
        sweep_w=sweep_w,
        percentile=percentile,
        eval_every=eval_every if sequential else None,
        ray=ray.options(),
    )
    with run:
        if dataset is not None and not as_json:
            _stderr().print(f"Finding {n_edits} mistakes of the unedited model on {dataset}...")
        run.load()
        # the bar counts the questions put to the model (an ETA for long runs)
        with _progress(run.planned_answers(), "Evaluating", True) as advance:
            report = run.run(progress=advance)
        edit_list, probe_list = run.edits, run.probes
    if report_dir is not None:
        write_report(report, report_dir)
    if as_json:
        _print_json(report)
    else:
        out = _stdout()
        out.print(markdown_table(report), markup=False)
        sweeps = sweep_markdown(report)
        if sweeps:
            out.print(sweeps, markup=False)
        out.print(
            f"{len(edit_list)} edits, {len(probe_list)} probes, "
            f"{report['runtime_s']['total']:.1f} s"
        )


# ------------------------------------------------------------------ doctor
@app.command()
@handle_errors
def doctor(
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Rebuild what survives allows: manifest.json from versions/, lost edits "
            "from their keys, lost keys by re-embedding (codebook's model), the index; "
            "remove staging folders of dead Ray jobs. Deletes nothing.",
        ),
    ] = False,
    codebook: CodebookOpt = DEFAULT_CODEBOOK,
    lock_timeout: LockOpt = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Verify a codebook's files and checksums; --repair rebuilds what is damaged.

    Example: reasonedit doctor --repair
    """
    from reasonedit_cli.editor import check_codebook

    report = check_codebook(codebook, repair=repair, lock_timeout=lock_timeout)
    if as_json:
        _print_json(
            {
                "ok": report.ok,
                "version": report.version,
                "problems": report.problems,
                "repaired": report.repaired,
                "notes": report.notes,
            }
        )
    else:
        out = _stdout()
        for line in report.repaired:
            out.print(f"repaired: {line}", markup=False)
        for line in report.problems:
            out.print(f"problem: {line}", markup=False)
        out.print("codebook OK" if report.ok else f"{len(report.problems)} problem(s) found")
    if not report.ok:
        raise typer.Exit(1)


# ----------------------------------------------------- list, show, export
@app.command("list")
@handle_errors
def list_edits(
    question: Annotated[
        str | None,
        typer.Option("--question", "-q", help="Only edits whose question contains TEXT."),
    ] = None,
    answer: Annotated[
        str | None, typer.Option("--answer", "-a", help="Only edits whose answer contains TEXT.")
    ] = None,
    edit_id: Annotated[
        str | None, typer.Option("--id", help="Only edits whose id contains TEXT.")
    ] = None,
    image: Annotated[
        str | None, typer.Option("--image", help="Only edits whose image hash starts with HEX.")
    ] = None,
    codebook: CodebookOpt = DEFAULT_CODEBOOK,
    as_json: JsonOpt = False,
) -> None:
    """List the codebook's edits: id, question, answer, image, keys, version added.

    Filters are case-insensitive substrings and combine. Example: reasonedit list -q color
    """
    from reasonedit_cli.editor import Editor

    rows = Editor(codebook).list_edits(
        question=question, answer=answer, edit_id=edit_id, image=image
    )
    if as_json:
        _print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"Edits in {codebook} ({len(rows)})")
    for col in ("id", "question", "answer", "image", "keys", "added in"):
        table.add_column(col, justify="right" if col in ("keys", "added in") else "left")
    for r in rows:
        table.add_row(
            _esc(r["id"]),
            _esc(r["question"]),
            _esc(r["answer"]),
            r["image"][:12],
            str(r["keys"]),
            f"v{r['version']}" if r["version"] is not None else "?",
        )
    _table_out().print(table)


@app.command()
@handle_errors
def show(
    edit_id: Annotated[str, typer.Argument(help="The edit id (see `reasonedit list`).")],
    image_out: Annotated[
        Path | None,
        typer.Option("--image-out", help="Write the edit's image with its boxes drawn (PNG)."),
    ] = None,
    codebook: CodebookOpt = DEFAULT_CODEBOOK,
    as_json: JsonOpt = False,
) -> None:
    """Show one edit: its question, answer, facts, and its keys with kinds, boxes, radii.

    Example: reasonedit show shape-circle-852 --image-out circle.png
    """
    from reasonedit_cli.editor import Editor

    info = Editor(codebook).show_edit(edit_id, image_out=image_out)
    if as_json:
        _print_json(info)
        return
    from rich.table import Table

    out = _table_out()
    out.print(f"[bold]{_esc(info['id'])}[/bold]  (added in v{info['version']}, {info['added']})")
    out.print(f"[bold]Q:[/bold] {_esc(info['question'])}")
    out.print(f"[bold]A:[/bold] {_esc(info['answer'])}")
    out.print(f"image {info['image_file']}, source {_esc(info['source'] or '-')}")
    out.print("[bold]Facts:[/bold]")
    for fact in info["facts"]:
        out.print(f"  - {_esc(fact)}")
    table = Table(title=f"Keys ({len(info['keys'])})")
    for col in ("#", "kind", "text", "box", "radius", "key", "shared with"):
        table.add_column(col)
    for i, k in enumerate(info["keys"], start=1):
        others = [e for e in k["edit_ids"] if e != info["id"]]
        table.add_row(
            str(i),
            k["kind"],
            _esc(k["text"]),
            "-" if k["box"] is None else ",".join(map(str, k["box"])),
            "-" if k["radius"] is None else f"{k['radius']:.3f}",
            k["key_id"][:12],
            _esc(", ".join(others)) or "-",
        )
    out.print(table)
    if image_out is not None:
        numbered = "; ".join(
            f"{i} = {','.join(map(str, b))}" for i, b in enumerate(info["image_boxes"], start=1)
        )
        out.print(f"Wrote {_esc(info['image_out'])}" + (f" (boxes {numbered})" if numbered else ""))


@app.command()
@handle_errors
def export(
    out_dir: Annotated[
        Path, typer.Argument(help="Folder to write (absent or empty): edits.jsonl, images/.")
    ],
    edit_ids: Annotated[
        list[str] | None, typer.Option("--id", help="Export only this edit (repeat).")
    ] = None,
    codebook: CodebookOpt = DEFAULT_CODEBOOK,
    as_json: JsonOpt = False,
) -> None:
    """Export the edits as JSONL plus images, which `add-edit --from` reads back.

    Example: reasonedit export backup/ && reasonedit add-edit -c cb2 --from backup/edits.jsonl
    """
    from reasonedit_cli.editor import Editor

    record = Editor(codebook).export(out_dir, edit_ids=edit_ids)
    if as_json:
        _print_json(record)
    else:
        _stdout().print(
            f"Exported {record['edits']} edit(s) and {record['images']} image(s) to "
            f"{record['path']}; read back with: reasonedit add-edit --from "
            f"{Path(record['path']) / 'edits.jsonl'}",
            markup=False,
        )


# ---------------------------------------------------- remove-edit, history
@app.command("remove-edit")
@handle_errors
def remove_edit(
    edit_ids: Annotated[list[str], typer.Argument(help="Ids of the edits to remove.")],
    codebook: CodebookOpt = DEFAULT_CODEBOOK,
    lock_timeout: LockOpt = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Remove edits from the live codebook in a new version (undo with `restore`).

    Example: reasonedit remove-edit tri-1 && reasonedit restore 3
    """
    from reasonedit_cli.editor import Editor

    record = Editor(codebook, lock_timeout=lock_timeout).remove_edits(edit_ids)
    version, previous = record["version"], record["previous"]
    if as_json:
        _print_json(record)
    else:
        _stdout().print(
            f"Removed {len(record['removed'])} edit(s); version {version} "
            f"(undo: reasonedit restore {previous})."
        )


@app.command()
@handle_errors
def history(codebook: CodebookOpt = DEFAULT_CODEBOOK, as_json: JsonOpt = False) -> None:
    """List the kept versions of the codebook.

    Example: reasonedit history
    """
    from reasonedit_cli.editor import Editor

    rows = Editor(codebook).history()
    if as_json:
        _print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"Versions of {codebook}")
    for col in ("version", "updated", "what it did", "edit rows", "key rows", "removed", "layer"):
        table.add_column(col, no_wrap=col == "updated")
    for r in rows:
        if r.get("damaged"):
            table.add_row("?", f"{r['file']} is damaged", "", "", "", "", "")
            continue
        mark = " (current)" if r["current"] else ""
        cells = (
            f"{r['version']}{mark}",
            str(r["updated"]),
            r.get("action", ""),
            str(r["segment_edits"]),
            str(r["segment_keys"]),
            str(r["removed_edits"]),
            str(r["layer"] or "-"),
        )
        table.add_row(*(_esc(c) for c in cells))
    _table_out().print(table)


@app.command()
@handle_errors
def restore(
    version: Annotated[int, typer.Argument(help="The version to bring back.")],
    codebook: CodebookOpt = DEFAULT_CODEBOOK,
    lock_timeout: LockOpt = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Make an earlier version current again (as a new version; nothing is lost).

    Example: reasonedit restore 3
    """
    from reasonedit_cli.editor import Editor

    record = Editor(codebook, lock_timeout=lock_timeout).restore(version)
    if as_json:
        _print_json(record)
    else:
        _stdout().print(f"Restored version {version} as version {record['version']}.")


# ------------------------------------------------------------------- serve
@app.command()
@handle_errors
@cs.model_options
def serve(
    host: Annotated[
        str,
        typer.Option("--host", help="Address to bind; other than loopback only with --api-key."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free port).")] = 8000,
    api_key: ApiKeyOpt = None,
    allow_local_files: Annotated[
        bool,
        typer.Option(
            "--allow-local-files",
            help="Accept image_url parts that name a file on this machine (off by default).",
        ),
    ] = False,
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, help="Requests per generate call.")
    ] = 16,
    batch_wait_ms: Annotated[
        float,
        typer.Option("--batch-wait-ms", min=0, help="How long a request waits for others."),
    ] = 5.0,
    max_queue: Annotated[
        int, typer.Option("--max-queue", min=1, help="Waiting requests; beyond this 503.")
    ] = 64,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.001, help="Seconds per request (504 after).")
    ] = 60.0,
    max_body_bytes: Annotated[
        int, typer.Option("--max-body-bytes", min=1, help="Largest request body (413).")
    ] = 20 * 1024 * 1024,
    max_image_bytes: Annotated[
        int, typer.Option("--max-image-bytes", min=1, help="Largest image (413).")
    ] = 10 * 1024 * 1024,
    max_tokens_limit: Annotated[
        int, typer.Option("--max-tokens-limit", min=1, help="Largest max_tokens accepted.")
    ] = 256,
    poll_interval: Annotated[
        float,
        typer.Option(
            "--poll-interval", min=0.01, help="Seconds between codebook checks when idle."
        ),
    ] = 1.0,
    no_objects: Annotated[bool, cs.option("no_objects", NO_OBJECTS_QUERY_HELP)] = False,
    codebook: CodebookOpt = DEFAULT_CODEBOOK,
    models: cs.ModelOptions = cs.ModelOptions(),
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print {url, model, version} as JSON on stdout once listening."
        ),
    ] = False,
) -> None:
    """Serve the edited model over an OpenAI-compatible HTTP API, picking up new edits live.

    Endpoints: POST /v1/chat/completions (one image, one question), GET /v1/models,
    GET /healthz, GET /v1/codebook.

    Read-only: edits go through add-edit, remove-edit, restore and calibrate.

    Example: reasonedit serve -c cb --port 8000
    """
    from reasonedit_cli.server import ServeOptions, check_installed
    from reasonedit_cli.server import serve as run_server

    options = ServeOptions(
        host=host,
        port=port,
        api_key=api_key,
        allow_local_files=allow_local_files,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        max_queue=max_queue,
        timeout=timeout,
        max_body_bytes=max_body_bytes,
        max_image_bytes=max_image_bytes,
        max_tokens_limit=max_tokens_limit,
        poll_interval=poll_interval,
    )
    options.check()  # usage errors before any model loads
    check_installed()
    editor = models.editor(codebook, objects=not no_objects)
    run_server(editor, options, on_ready=_print_json if as_json else None)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    app()
