"""Pieces the `reasonedit` commands share: the command group, the option groups, and
option callbacks that validate while parsing.

- The option groups (`model_options`, `ray_options`) declare a set of options once; a
  command takes the whole group as one object (`ModelOptions`, `RayFlags`), and
  `ModelOptions.editor` is the one place the CLI builds an `Editor`.

- `Group` prints every usage error (Click's own and ours) as one `Error: ...` line with
  exit code 2; help renders boolean flags as plain flags (`--json`, not `--json <bool>`);
  `inherit_codebook` lets commands take the global `-c/--codebook` given before the
  command name.
- The callbacks check a value while the command line is parsed, so a bad value is a
  usage error (exit 2) before any model loads, with the same wording in every command.
  What is valid is decided in `reasonedit_cli.validation`, shared with the file readers.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup, TyperOption

from reasonedit_cli import validation

if TYPE_CHECKING:  # pragma: no cover
    from reasonedit_cli.backend import TextBackend, VLMBackend
    from reasonedit_cli.distributed import RayOptions
    from reasonedit_cli.editor import Editor

F = TypeVar("F", bound=Callable[..., Any])

#: Where the root callback keeps the global `--codebook` (in `ctx.meta`, shared by every
#: context of one invocation).
GLOBAL_CODEBOOK = "reasonedit.codebook"


class Group(TyperGroup):
    """The root command group of `reasonedit`."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Run the command; a usage error becomes one `Error:` line (exit 2)."""
        kwargs["standalone_mode"] = False
        if not standalone_mode:
            return super().main(*args, **kwargs)
        try:
            code = super().main(*args, **kwargs)
        except typer.exceptions.TyperException as exc:  # Click's usage errors
            show = getattr(exc, "show", None)
            if type(exc).__name__ == "NoArgsIsHelpError" and show is not None:
                show()  # the help text itself
            else:
                ctx = getattr(exc, "ctx", None)
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                message = exc.format_message().replace("\n", " ")
                typer.echo(f"Error: {message}{hint}", err=True)
            sys.exit(getattr(exc, "exit_code", 2))
        except typer.Abort:
            typer.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _flag_aware(display_type_rich: Callable[..., Any]) -> Callable[..., Any]:
    """Typer 0.29 renders every option's type in help, flags too (`--json <bool>`); a flag
    takes no value, so it shows none."""

    def display(self: Any, ctx: Any) -> Any:
        if getattr(self, "is_flag", False) and not getattr(self, "count", False):
            return None
        return display_type_rich(self, ctx)

    display.__doc__ = display_type_rich.__doc__
    return display


if not getattr(TyperOption.display_type_rich, "_reasonedit", False):
    TyperOption.display_type_rich = _flag_aware(TyperOption.display_type_rich)  # type: ignore[method-assign]
    TyperOption.display_type_rich._reasonedit = True  # type: ignore[attr-defined]


# ------------------------------------------------------------------ callbacks
def choice(*choices: str) -> Callable[[Any], Any]:
    """A callback accepting only `choices` (for plain string options)."""

    def check(value: Any) -> Any:
        if value is None:
            return value
        problem = validation.choice_problem(value, choices)
        if problem:
            raise typer.BadParameter(problem)
        return value

    return check


def device_choice(value: str) -> str:
    return choice(*validation.DEVICES)(value)


def dtype_choice(value: str) -> str:
    return choice(*validation.DTYPES)(value)


def engine_choice(value: str) -> str:
    from reasonedit_cli.distributed import ENGINES

    return choice(*ENGINES)(value)


def text_value(value: str | None) -> str | None:
    """A question or answer given as a flag: not empty, not only punctuation."""
    if value is None:
        return value
    problem = validation.text_problem(value)
    if problem:
        raise typer.BadParameter(problem)
    return value.strip()


def reasoning_value(value: list[str] | None) -> list[str] | None:
    """Reasoning flags: every sentence a statement, not `...` or a placeholder."""
    if not value:
        return value
    from reasonedit_cli.edits import split_sentences

    for i, text in enumerate(value, start=1):
        sentences = split_sentences(text)
        if not sentences:
            raise typer.BadParameter(f"reasoning {i} is empty")
        for sentence in sentences:
            problem = validation.sentence_problem(sentence)
            if problem:
                raise typer.BadParameter(problem)
    return value


def max_image_pixels(value: int | None) -> int | None:
    """Apply `--max-image-pixels` (or its environment variable) to this process."""
    from reasonedit_cli.edits import set_max_image_pixels

    set_max_image_pixels(value)
    return value


def verbose(value: bool) -> bool:
    """Library logging on stderr with `--verbose`; otherwise errors only."""
    from reasonedit_cli.hub import configure_library_logging

    configure_library_logging(verbose=value)
    return value


def global_codebook(ctx: typer.Context, value: Any) -> Any:
    """The root's `-c`: remembered for the command that follows."""
    if value is not None:
        ctx.meta[GLOBAL_CODEBOOK] = value
    return value


def inherit_codebook(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
    """A command's `--codebook`, else the one given before the command name."""
    source = ctx.get_parameter_source(param.name or "codebook")
    inherited = ctx.meta.get(GLOBAL_CODEBOOK)
    if inherited is not None and (source is None or source.name != "COMMANDLINE"):
        return inherited
    return value


def one_of_aliases(value: Any, alias: Any, name: str, old: str) -> Any:
    """The value of an option given under its name or its older, hidden alias."""
    if value is not None and alias is not None:
        from reasonedit_cli.errors import UsageError

        raise UsageError(f"{old} is another name for {name}: give one of them")
    return value if value is not None else alias


# ------------------------------------------------------------ shared options
#: Options that several commands take, by name: their flags and checks. Each command
#: words its own help (what `--from` reads differs between add-edit, ask, calibrate and
#: evaluate), so a command declares `Annotated[Path | None, option("image", "...")]`.
_SHARED_OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "image": (("--image", "-i"), {}),
    "question": (("--question", "-q"), {"callback": text_value}),
    "from": (("--from", "-f"), {}),
    "format": (("--format",), {}),
    "images_root": (("--images-root",), {}),
    "batch_size": (("--batch-size",), {"min": 1}),
    "percentile": (("--percentile",), {"min": 0, "max": 100}),
    "seed": (("--seed",), {}),
    "dry_run": (("--dry-run",), {}),
    "no_objects": (("--no-objects",), {}),
}


def option(name: str, help: str | None = None) -> Any:
    """The `typer.Option` of the shared option `name` (see `_SHARED_OPTIONS`) with `help`."""
    flags, checks = _SHARED_OPTIONS[name]
    return typer.Option(*flags, help=help, **checks)


# ------------------------------------------------------------ option groups
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="VLM: a local directory, a Hugging Face id, or a bundled model: demo (easy-vqa) "
        "or scenes (multi-object scenes). Default: the codebook's model, else demo.",
    ),
]
TextModelOpt = Annotated[
    str | None,
    typer.Option(
        "--text-model", help="Sentence-transformers model (default all-MiniLM-L6-v2, bundled)."
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", callback=device_choice, help="auto | cpu | cuda | mps")
]
DtypeOpt = Annotated[
    str,
    typer.Option("--dtype", callback=dtype_choice, help="auto | float32 | bfloat16 | float16"),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code", help="Allow model code from the checkpoint (off by default)."
    ),
]
EngineOpt = Annotated[
    str,
    typer.Option(
        "--engine",
        callback=engine_choice,
        help="local: compute in this process; ray: spread the model work over a Ray cluster "
        "(pip install 'reasonedit-cli\\[ray]').",
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="With --engine ray: the cluster (auto, HOST:PORT or ray://HOST:PORT); "
        "default: a cluster this process already joined, else a new local instance.",
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        min=1,
        help="With --engine ray: workers, each loading the models once "
        "(default: one per GPU with --gpus-per-worker, else one per CPU).",
    ),
]
GpusPerWorkerOpt = Annotated[
    float,
    typer.Option(
        "--gpus-per-worker", min=0, help="With --engine ray: GPUs per worker (0.5 shares one)."
    ),
]


@dataclass(frozen=True)
class ModelOptions:
    """--model, --text-model, --device, --dtype, --trust-remote-code: which models a
    command loads (when it needs them)."""

    model: str | None = None
    text_model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False

    def given(self) -> list[str]:
        """The flags given with other than their default values (`ask --server`, where
        the server's models answer, refuses them)."""
        flags = {
            "model": "--model",
            "text_model": "--text-model",
            "device": "--device",
            "dtype": "--dtype",
            "trust_remote_code": "--trust-remote-code",
        }
        return [flags[f.name] for f in fields(self) if getattr(self, f.name) != f.default]

    def editor(
        self,
        codebook: str | Path | None,
        *,
        create: bool = False,
        lock_timeout: float = 10.0,
        preset: str | None = None,
        vlm: VLMBackend | None = None,
        text: TextBackend | None = None,
        objects: bool = True,
    ) -> Editor:
        """The `Editor` on `codebook` with these models: how every command builds one.

        `vlm` / `text` hand in already-built backends (a fake in tests, a shared model in
        an application) instead of loading `--model` / `--text-model`."""
        from reasonedit_cli.editor import Editor

        return Editor(
            codebook,
            model=self.model,
            text_model=self.text_model,
            device=self.device,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
            create=create,
            lock_timeout=lock_timeout,
            preset=preset,
            vlm=vlm,
            text=text,
            objects=objects,
        )


@dataclass(frozen=True)
class RayFlags:
    """--engine, --ray-address, --workers, --gpus-per-worker."""

    engine: str = "local"
    ray_address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0.0

    def options(self) -> RayOptions | None:
        """`distributed.RayOptions` for --engine ray, None for local; the Ray flags
        without --engine ray are a usage error."""
        from reasonedit_cli.distributed import ENGINES, RayOptions
        from reasonedit_cli.errors import UsageError

        if self.engine not in ENGINES:
            raise UsageError(f"--engine must be one of {', '.join(ENGINES)}")
        if self.engine == "local":
            if self.ray_address is not None or self.workers is not None or self.gpus_per_worker:
                raise UsageError("--ray-address, --workers and --gpus-per-worker need --engine ray")
            return None
        return RayOptions(
            address=self.ray_address, workers=self.workers, gpus_per_worker=self.gpus_per_worker
        )


def option_group(
    name: str, build: Callable[..., Any], options: Sequence[tuple[str, Any, Any]]
) -> Callable[[F], F]:
    """A decorator: the command's parameter `name` becomes the options `(param, Annotated
    type, default)` in its place (so --help lists them where the parameter stood), and
    the command receives them as one object, `build(**values)`."""

    def decorate(func: F) -> F:
        sig = inspect.signature(func, eval_str=True)
        params: list[inspect.Parameter] = []
        for p in sig.parameters.values():
            if p.name != name:
                params.append(p)
                continue
            params += [
                inspect.Parameter(n, p.kind, default=default, annotation=annotation)
                for n, annotation, default in options
            ]
        names = [n for n, _, _ in options]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[name] = build(**{n: kwargs.pop(n) for n in names})
            return func(*args, **kwargs)

        new = sig.replace(parameters=params)
        wrapper.__signature__ = new  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper  # type: ignore[return-value]

    return decorate


#: `@model_options`: the command's `models: ModelOptions` parameter is the five options.
model_options = option_group(
    "models",
    ModelOptions,
    [
        ("model", ModelOpt, None),
        ("text_model", TextModelOpt, None),
        ("device", DeviceOpt, "auto"),
        ("dtype", DtypeOpt, "auto"),
        ("trust_remote_code", TrustOpt, False),
    ],
)
#: `@ray_options`: the command's `ray: RayFlags` parameter is the four engine options.
ray_options = option_group(
    "ray",
    RayFlags,
    [
        ("engine", EngineOpt, "local"),
        ("ray_address", RayAddressOpt, None),
        ("workers", WorkersOpt, None),
        ("gpus_per_worker", GpusPerWorkerOpt, 0.0),
    ],
)


# --------------------------------------------------------- library wording
_PARAM = re.compile(r"`([a-z][a-z0-9_]*)`")
#: library parameter names whose command option has another name
PARAM_ALIASES = {"pairs_file": "pairs", "edits_file": "edits"}


def in_cli_words(message: str, ctx: Any) -> str:
    """A library message as the CLI says it: each `param` (a library parameter name in
    backquotes) becomes the running command's flag for it (`text_model` ->
    --text-model). Names the command has no option for keep their backquotes."""
    flags: dict[str, str] = {}
    if ctx is not None:
        for p in getattr(ctx.command, "params", []):
            long = [o for o in getattr(p, "opts", []) if o.startswith("--")]
            if long and p.name:
                flags[p.name] = long[0]

    def flag(m: re.Match[str]) -> str:
        name = m.group(1)
        return flags.get(PARAM_ALIASES.get(name, name)) or flags.get(name) or m.group(0)

    return _PARAM.sub(flag, message)
