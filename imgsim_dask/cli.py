"""The `imgsim` command line: a thin layer over the Python API that owns the terminal.

Its options are generated from the option dataclasses (`options.py`), so each default, check
and help text lives there once; errors that name an option are shown with its flag.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .about import PACKAGE
from .errors import ImgsimError
from .options import (
    DEFAULT_STORE,
    OPTION_CLASSES,
    ClusterOptions,
    CsvOptions,
    ExtractOptions,
    MatchOptions,
    flag_of,
)
from .quiet import quiet_native_logs
from .schema import SourceMeta

EXIT_USAGE = 2


def _split(value: str | None) -> tuple[str, ...] | None:
    """A comma-separated option as a tuple (None when not given)."""
    if value is None:
        return None
    return tuple(c.strip() for c in value.split(",") if c.strip())


def _click_type(spec: dataclasses.Field, hint: Any) -> Any:
    """The click type of an option field, from its annotation and declared bounds."""
    meta = spec.metadata
    if meta.get("choices"):
        return click.Choice(meta["choices"])
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    minimum = meta.get("minimum")
    if base is int:
        return click.IntRange(int(minimum)) if minimum is not None else int
    if base is float:
        return click.FloatRange(minimum) if minimum is not None else float
    return str


class OptionGroup:
    """The CLI options of one option dataclass (and the dataclasses nested in it)."""

    def __init__(self, cls: type):
        self.cls = cls
        self.hints = typing.get_type_hints(cls)
        self.fields = list(dataclasses.fields(cls))
        self.nested = {
            f.name: OptionGroup(self.hints[f.name])
            for f in self.fields
            if dataclasses.is_dataclass(self.hints[f.name])
        }

    def param(self, spec: dataclasses.Field) -> str:
        """The click parameter name of a field: its flag's, so names never collide."""
        return flag_of(spec).split("/")[0].removeprefix("--").replace("-", "_")

    def decorators(self) -> list[Callable]:
        """One click option per CLI field, in declaration order."""
        found = []
        for spec in self.fields:
            if spec.name in self.nested:
                found += self.nested[spec.name].decorators()
                continue
            if not spec.metadata.get("cli"):
                continue
            meta, flag = spec.metadata, flag_of(spec)
            kwargs: dict[str, Any] = {"help": meta["help"], "metavar": meta.get("metavar")}
            if isinstance(spec.default, bool):
                if "/" in flag:
                    kwargs.update(default=spec.default, show_default=True)
                else:  # --flag sets the opposite of the default
                    kwargs.update(is_flag=True, flag_value=not spec.default, default=spec.default)
            elif meta.get("list_of"):
                listed = spec.default if isinstance(spec.default, tuple) else ()
                kwargs.update(
                    default=",".join(listed) if listed else None, show_default=bool(listed)
                )
            else:
                default = None if spec.default is dataclasses.MISSING else spec.default
                kwargs.update(
                    type=_click_type(spec, self.hints[spec.name]),
                    default=default,
                    show_default=default is not None,
                )
            found.append(click.option(flag, self.param(spec), **kwargs))
        return found

    def __call__(self, command: Callable) -> Callable:
        for decorator in reversed(self.decorators()):
            command = decorator(command)
        return command

    def pop(self, kw: dict[str, Any], typed: dict[str, Any] | None = None) -> Any:
        """Build the dataclass from (and remove) its fields' values in click's `kw`; `typed`
        gets the values of its own fields given on the command line (even where they equal
        the default), so a resumed run can tell them from the stored ones."""
        values: dict[str, Any] = {}
        context = click.get_current_context(silent=True)
        for spec in self.fields:
            if spec.name in self.nested:
                values[spec.name] = self.nested[spec.name].pop(kw)
            elif spec.metadata.get("cli"):
                value = kw.pop(self.param(spec))
                values[spec.name] = _split(value) if spec.metadata.get("list_of") else value
                source = context.get_parameter_source(self.param(spec)) if context else None
                if typed is not None and source in _GIVEN:
                    typed[spec.name] = values[spec.name]
        return self.cls(**values)


_GIVEN = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)


def _flag_names() -> dict[str, str]:
    """Every CLI option field's flag, by field name (as errors name them)."""
    names = {}
    for cls in OPTION_CLASSES:
        for spec in dataclasses.fields(cls):
            if spec.metadata.get("cli"):
                names[spec.name] = flag_of(spec).split("/")[0]
    return names


FLAGS = _flag_names()
CSV = OptionGroup(CsvOptions)
EXTRACT = OptionGroup(ExtractOptions)
MATCH = OptionGroup(MatchOptions)
CLUSTER = OptionGroup(ClusterOptions)
store_option = click.option(
    "--store",
    default=DEFAULT_STORE,
    show_default=True,
    type=click.Path(file_okay=False),
    help="Feature store directory.",
)
out_option = click.option(
    "--out", type=click.Path(), help="Result table: .parquet, .csv or a directory."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name=PACKAGE)
@click.option("-v", "--verbose", is_flag=True, help="Show debug logs (TensorFlow's too).")
def cli(verbose: bool) -> None:
    """Find similar and near-duplicate images across huge collections of image URLs, on Dask."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("imgsim_dask").setLevel(logging.DEBUG if verbose else logging.INFO)
    quiet_native_logs(show=verbose)


@cli.command()
@click.argument("csv", type=str)
@click.option("--name", required=True, help="Name of the source in the store.")
@store_option
@CSV
@EXTRACT
@CLUSTER
def extract(csv: str, name: str, store: str, **kw: Any) -> None:
    """Extract CNN features for every row of CSV into STORE/NAME."""
    from .driver import extract as run_extract

    typed: dict[str, Any] = {}
    csv_options, options = CSV.pop(kw, typed), EXTRACT.pop(kw, typed)
    source = run_extract(
        csv,
        name,
        store,
        cluster=CLUSTER.pop(kw),
        csv_options=csv_options,
        options=options,
        **typed,
    )
    _print_summary(source.meta, source.path)


def _print_summary(meta: SourceMeta, path: Path) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in meta.status_counts.items())
    click.echo(
        f"{meta.name}: {meta.rows} rows ({counts}) in {meta.seconds:.1f} s, "
        f"{meta.images_per_second} images/s -> {path}"
    )
    if meta.rows and not meta.status_counts.get("ok"):
        status, count = max(meta.status_counts.items(), key=lambda item: item[1])
        hint = (
            f"; is {meta.url_col!r} the column of URLs? (--url-col)"
            if status in ("not_found", "bad_url")
            else ""
        )
        click.echo(f"imgsim: warning: no row gave an image ({count} {status}){hint}", err=True)
    if meta.stages:
        fetch, embed = meta.stages["fetch"], meta.stages["embed"]
        click.echo(
            f"  fetch {fetch['task_seconds']:.1f} task-s ({fetch['rows_per_task_second']} "
            f"rows/s per task), embed {embed['task_seconds']:.1f} task-s "
            f"({embed['images_per_task_second']} images/s per task)"
        )


@cli.command()
@click.argument("name")
@store_option
def info(name: str, store: str) -> None:
    """Show a stored source: counts by status, model, dimension."""
    from .store import open_source

    source = open_source(store, name)
    meta = source.meta
    click.echo(
        f"name      {meta.name}\npath      {source.path}\nmodel     {meta.model} "
        f"({meta.dim}-d, weights: {meta.weights})\nrows      {meta.rows}"
    )
    for status, count in source.status_counts().items():
        click.echo(f"  {status:<20} {count}")
    click.echo(
        f"csv       {meta.csv} (url column {meta.url_col!r})\n"
        f"extracted {meta.created} in {meta.seconds:.1f} s"
    )


@cli.command()
@click.argument("name")
@store_option
@click.option(
    "--h5",
    "h5_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="HDF5 file to write (.h5, dataset 'data'); the fields go beside it in "
    "STEM_fields.csv, tab-separated as the original's.",
)
def export(name: str, store: str, h5_path: str) -> None:
    """Export a source in the original's layout: HDF5 features of the ok rows + their fields."""
    from .store import open_source

    h5, fields = open_source(store, name).export_h5(h5_path)
    click.echo(f"wrote {h5} and {fields}")


@cli.command()
@click.argument("name1")
@click.argument("name2")
@store_option
@MATCH
@out_option
@CLUSTER
def match(name1: str, name2: str, store: str, out: str | None, **kw: Any) -> None:
    """Match source NAME1 against NAME2 (the same name: near-duplicates within it)."""
    from .pairs import match_sources

    options = MATCH.pop(kw)
    _print_match(
        match_sources(name1, name2, store, out=out, cluster=CLUSTER.pop(kw), options=options)
    )


@cli.command()
@click.argument("name")
@store_option
@MATCH
@out_option
@CLUSTER
def dedupe(name: str, store: str, out: str | None, **kw: Any) -> None:
    """Find near-duplicate groups within one source (each pair once, with a group id)."""
    from .pairs import match_sources

    options = MATCH.pop(kw)
    _print_match(
        match_sources(name, name, store, out=out, cluster=CLUSTER.pop(kw), options=options)
    )


@cli.command()
@click.argument("csv1")
@click.argument("csv2", required=False)
@click.option(
    "--names",
    metavar="NAME1[,NAME2]",
    help="Names of the sources, one per CSV [default: the CSV file stems].",
)
@store_option
@CSV
@EXTRACT
@MATCH
@out_option
@CLUSTER
def run(
    csv1: str, csv2: str | None, names: str | None, store: str, out: str | None, **kw: Any
) -> None:
    """Extract CSV1 and CSV2 (reusing complete sources) and match them; one CSV: dedupe it."""
    from .workflow import run as run_job

    typed: dict[str, Any] = {}
    csv_options, options, match_options = CSV.pop(kw, typed), EXTRACT.pop(kw, typed), MATCH.pop(kw)
    split = _split(names)
    result = run_job(
        csv1,
        csv2,
        list(split) if split else None,
        store,
        out=out,
        cluster=CLUSTER.pop(kw),
        csv_options=csv_options,
        options=options,
        match_options=match_options,
        **typed,
    )
    _print_match(result)


@cli.command()
@click.option(
    "--dir",
    "workdir",
    default="imgsim-demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the demo writes images and results.",
)
@click.option("--workers", type=click.IntRange(1), help="Fetch workers of the local cluster.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def demo(workdir: str, workers: int | None, progress: bool) -> None:
    """Offline demo: serve sample photos and edited copies on 127.0.0.1, extract, match."""
    from .demo import run_demo

    result = run_demo(
        Path(workdir), ClusterOptions(workers=workers), progress, on_serving=click.echo
    )
    _print_match(result, show=len(result.pairs))


def _print_match(result: Any, show: int = 10) -> None:
    table = result.pairs
    if len(table) and show:
        columns = [c for c in table.columns if c.endswith(("_id", "_title"))] + ["similarity"]
        click.echo(table[columns].head(show).to_string(index=False))
    click.echo(result.summary())
    if len(table) > show and result.path is None:
        click.echo(f"(showing {show} of {len(table)} pairs; --out FILE writes them all)")


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # plain `imgsim`: help, not an error
        click.echo(exc.ctx.get_help())
    except click.exceptions.Abort:
        click.echo("imgsim: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # bad options: one line too, with where to look
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see: {exc.ctx.command_path} -h)"
        click.echo(f"imgsim: error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except ImgsimError as exc:  # the API's parameter names, as this command's flags
        message = exc.render(lambda name: FLAGS.get(name, "--" + name.replace("_", "-")))
        click.echo(f"imgsim: error: {message}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo("imgsim: interrupted", err=True)
        sys.exit(130)
