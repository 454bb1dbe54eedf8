"""The `imgsim` command line: a thin layer over the Python API that owns the terminal.

Its options are generated from the option dataclasses (`options.py`), so each default, check
and help text lives there once; errors that name an option are shown with its flag.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
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
    ReviewOptions,
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

    def __init__(self, cls: type, leave_out: tuple[str, ...] = (), helps: dict | None = None):
        """`leave_out`: fields that do not apply to a command (they keep their defaults);
        `helps`: help texts that a command words its own way, by field."""
        self.cls = cls
        self.hints = typing.get_type_hints(cls)
        self.fields = [f for f in dataclasses.fields(cls) if f.name not in leave_out]
        self.helps = helps or {}
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
            kwargs: dict[str, Any] = {
                "help": self.helps.get(spec.name, meta["help"]),
                "metavar": meta.get("metavar"),
            }
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
DEDUPE = OptionGroup(
    MatchOptions,
    helps={
        "threshold": "Keep pairs with similarity >= THRESH [default: the model's, 0.845 for "
        "mobilenet; -1 with --top-k: plain nearest neighbours]."
    },
)
REVIEW = OptionGroup(ReviewOptions)
CLUSTER = OptionGroup(ClusterOptions)
# matching runs on the GPU workers only: the local cluster's fetch workers do not apply
SCORING_CLUSTER = OptionGroup(ClusterOptions, leave_out=("workers",))
store_option = click.option(
    "--store",
    default=DEFAULT_STORE,
    show_default=True,
    help="Feature store: a directory, or a URL fsspec reaches (s3://bucket/prefix, gs://...).",
)
review_option = click.option(
    "--review",
    "review_out",
    type=click.Path(),
    help="Also write the review page of the result: FILE.html, or DIR/ for a folder.",
)
out_option = click.option(
    "--out",
    type=click.Path(),
    help="Result: a .parquet or .csv file, or DIR/ (local or a URL such as s3://bucket/x/) "
    "for a Parquet dataset that the workers write, a part per block: for results larger "
    "than this process's memory.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name=PACKAGE)
@click.option("-v", "--verbose", is_flag=True, help="Show debug logs (TensorFlow's too).")
def cli(verbose: bool) -> None:
    """Find similar and near-duplicate images across huge collections of image URLs, on Dask."""
    import distributed  # noqa: F401  (its logging set up first, or its INFO lines would show)

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

    started = dt.datetime.now(dt.UTC)
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
    _print_summary(source.meta, source.path, started)


def _print_summary(meta: SourceMeta, path: Any, started: dt.datetime) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in meta.status_counts.items())
    if dt.datetime.fromisoformat(meta.created) < started.replace(microsecond=0):
        click.echo(
            f"{meta.name}: already complete, nothing done: {meta.rows} rows ({counts}), "
            f"made {meta.created} -> {path}"
        )
        return
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
            f"({embed['images_per_task_second']} images/s per task)" + _idle(embed)
        )


def _idle(embed: dict) -> str:
    """', model idle 12% (4.8 s)': how long the model waited for images (older sources: '')."""
    if embed.get("idle_share") is None:
        return ""
    return f", model idle {embed['idle_share']:.0%} ({embed['idle_seconds']:.1f} s)"


@cli.command()
@click.argument("name", required=False)
@store_option
def info(name: str | None, store: str) -> None:
    """Show a stored source: counts by status, model, dimension (no NAME: list the store)."""
    from .store import open_source

    if name is None:
        _list_store(store)
        click.echo("(imgsim info NAME shows one)")
        return
    source = open_source(store, name)
    meta = source.meta
    click.echo(
        f"name      {meta.name}\npath      {source.path}\nmodel     {meta.model} "
        f"({meta.dim}-d, weights: {meta.weights})\ndescriptor {meta.descriptor}"
        f"{f' at {meta.image_size} px' if meta.image_size else ''}\n"
        f"threshold {_threshold_shown(source)}\nrows      {meta.rows}"
    )
    for status, count in source.status_counts().items():
        click.echo(f"  {status:<20} {count}")
    click.echo(
        f"csv       {meta.csv} (url column {meta.url_col!r})\n"
        f"extracted {meta.created} in {meta.seconds:.1f} s"
    )


def _threshold_shown(source: Any) -> str:
    from .pairs import default_threshold

    threshold, where = default_threshold(source)
    if threshold is None:
        return f"none ({where}): pass --thresh, or run imgsim calibrate {source.name} --save"
    return f"{threshold:.3f} ({where})"


@cli.command(name="ls")
@store_option
def list_store(store: str) -> None:
    """List the sources in a store: rows, ok/failed, model, dimension, date."""
    _list_store(store)


def _list_store(store: str) -> None:
    import pandas as pd

    from .descriptor import LEGACY
    from .store import list_sources

    listed = list_sources(store)
    if not listed:
        click.echo(f"no sources in {store} (imgsim extract CSV --name NAME makes one)")
        return
    table = []
    for entry in listed:
        meta, plan = entry.meta, entry.plan
        row: dict[str, Any] = {"name": entry.name}
        if meta is None:
            row.update(
                rows=plan.get("rows", ""), ok="", failed="", model=plan.get("model", ""),
                descriptor=plan.get("descriptor", LEGACY).split("/")[0], features="", made="",
                state="incomplete: --resume continues it" if plan else "damaged",
            )  # fmt: skip
        else:
            ok = meta.status_counts.get("ok", 0)
            row.update(
                rows=meta.rows, ok=ok, failed=meta.rows - ok, model=meta.model,
                descriptor=meta.descriptor.split("/")[0], features=f"{meta.dim}-d",
                made=meta.created[:16].replace("T", " "),
                state="complete",
            )  # fmt: skip
        table.append(row)
    click.echo(pd.DataFrame(table).rename(columns={"made": "made (UTC)"}).to_string(index=False))


@cli.command()
@click.argument("name")
@store_option
@click.option("--status", help="Only rows of this status (e.g. not_found, timeout).")
@click.option("--examples", default=3, show_default=True, type=click.IntRange(0),
              help="Rows shown per status.")  # fmt: skip
@click.option("--out", type=click.Path(dir_okay=False), help="Write all of them: .csv or .parquet.")
def failures(name: str, store: str, status: str | None, examples: int, out: str | None) -> None:
    """Show the rows of a source that gave no image: counts by status, examples, errors."""
    from .errors import OptionError
    from .pairs import check_output_file, write_table
    from .store import open_source

    source = open_source(store, name)
    path = check_output_file(out) if out else None
    failed = source.failures(status)
    if status == "ok":
        raise OptionError("rows of status 'ok' gave an image; name a failure status")
    if status is not None and status not in source.status_counts():
        known = ", ".join(sorted(source.status_counts()))
        raise OptionError(f"{name} has no rows of status {status!r} (statuses: {known})")
    if not len(failed):
        click.echo(f"{name}: all {source.meta.rows} rows gave an image")
        return
    meta = source.meta
    shown = [c for c in dict.fromkeys([meta.id_col, meta.url_col]) if c in failed]
    for found, rows in failed.groupby("status", sort=False):
        click.echo(f"{found}: {len(rows)} of {meta.rows} rows")
        sample = rows.head(examples)[[*shown, "http_status", "error"]]
        if len(sample):
            click.echo(sample.to_string(index=False, max_colwidth=80))
    if path is not None:
        written = write_table(failed, path)
        click.echo(f"wrote {len(failed)} rows -> {written}")


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


@cli.command(name="import")
@click.argument("name")
@click.argument("features")
@store_option
@click.option(
    "--rows", "rows_table", help="Fields of the vectors: .csv, .tsv or .parquet, one row each."
)
@click.option("--id-col", help="Column identifying a row [default: the first of --rows].")
@click.option(
    "--descriptor",
    default="imported",
    show_default=True,
    help="What made the vectors (e.g. clip-vit-b32): only sources of one descriptor match.",
)
@click.option(
    "--thresh", "threshold", type=click.FloatRange(-1, 1),
    help="The source's default threshold [default: none; match then needs --thresh or --top-k].",
)  # fmt: skip
@click.option("--partition-rows", default=4096, show_default=True, type=click.IntRange(1))
@click.option("--overwrite", is_flag=True, help="Replace an existing source of this name.")
@click.option(
    "--append",
    is_flag=True,
    help="Add the rows to the source NAME (ids continue): then match with --new-only.",
)
def import_vectors(name: str, features: str, store: str, rows_table: str | None, **kw: Any) -> None:
    """Make a source from vectors you have: FEATURES is .npy, .zarr or .parquet, row i = row i."""
    from .embeddings import import_features

    source = import_features(name, features, store, rows=rows_table, **kw)
    counts = ", ".join(f"{k} {v}" for k, v in source.meta.status_counts.items())
    click.echo(
        f"{name}: {source.meta.rows} rows ({counts}), {source.meta.dim}-d "
        f"{source.meta.model} vectors -> {source.path}"
    )


@cli.command()
@click.argument("name1")
@click.argument("name2")
@store_option
@MATCH
@out_option
@review_option
@REVIEW
@SCORING_CLUSTER
def match(name1: str, name2: str, store: str, out: str | None, **kw: Any) -> None:
    """Match source NAME1 against NAME2 (the same name: near-duplicates within it)."""
    from .pairs import match_sources

    options, review = MATCH.pop(kw), _review_target(kw)
    result = match_sources(
        name1, name2, store, out=out, cluster=SCORING_CLUSTER.pop(kw), options=options
    )
    _print_match(result)
    _write_review(result, review)


@cli.command()
@click.argument("name")
@store_option
@DEDUPE
@out_option
@review_option
@REVIEW
@SCORING_CLUSTER
def dedupe(name: str, store: str, out: str | None, **kw: Any) -> None:
    """Find near-duplicate groups within one source (each pair once, with a group id)."""
    from .pairs import match_sources

    options, review = DEDUPE.pop(kw), _review_target(kw)
    result = match_sources(
        name, name, store, out=out, cluster=SCORING_CLUSTER.pop(kw), options=options
    )
    _print_match(result)
    _write_review(result, review)


@cli.command()
@click.argument("name")
@store_option
@click.option(
    "--precision",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.95,
    show_default=True,
    help="The precision the recommended threshold must reach.",
)
@click.option(
    "--sample",
    type=click.IntRange(20),
    default=200,
    show_default=True,
    help="Rows whose images are fetched again and edited (16 copies each).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Sample and edit seed.")
@click.option(
    "--save", is_flag=True, help="Store the threshold in the source: match and dedupe use it."
)
@CLUSTER
def calibrate(name: str, store: str, precision: float, sample: int, seed: int, save: bool,
              **kw: Any) -> None:  # fmt: skip
    """Measure the threshold for source NAME on edited copies of its own images."""
    from .calibrate import calibrate as run_calibration

    result = run_calibration(
        name, store, precision=precision, sample=sample, seed=seed, save=save,
        cluster=CLUSTER.pop(kw),
    )  # fmt: skip
    click.echo(f"{'threshold':>9}  {'precision':>9}  {'recall':>6}  pairs kept")
    for row in result.table.itertuples():
        click.echo(f"{row.threshold:9.2f}  {row.precision:9.3f}  {row.recall:6.3f}  {row.pairs}")
    click.echo(
        f"{result.sampled} rows sampled, {result.fetched} fetched again; "
        f"{result.positives} synthetic pairs, {result.negatives} pairs of different rows"
    )
    click.echo(
        f"recommended threshold: {result.threshold:.3f} (precision {result.precision:.3f}, "
        f"recall {result.recall:.3f} on {result.positives} synthetic pairs)"
    )
    if save:
        click.echo(f"saved in {name}: match and dedupe use it unless --thresh is given")


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
@review_option
@REVIEW
@CLUSTER
def run(
    csv1: str, csv2: str | None, names: str | None, store: str, out: str | None, **kw: Any
) -> None:
    """Extract CSV1 and CSV2 (reusing complete sources) and match them; one CSV: dedupe it."""
    from .workflow import run as run_job

    typed: dict[str, Any] = {}
    csv_options, options, match_options = CSV.pop(kw, typed), EXTRACT.pop(kw, typed), MATCH.pop(kw)
    review = _review_target(kw)
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
    _write_review(result, review)


@cli.command()
@click.argument("pairs")
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="The page: FILE.html (thumbnails inside), or DIR/ (index.html and thumbs/).",
)
@REVIEW
def review(pairs: str, out: str, **kw: Any) -> None:
    """Write an HTML page to look at the pairs file PAIRS (.parquet or DIR/ of a match)."""
    from .review import review_pairs

    _report_review(review_pairs(pairs, out, REVIEW.pop(kw)))


def _review_target(kw: dict[str, Any]) -> tuple[Any, ReviewOptions] | None:
    """`--review`'s page, checked before any work starts, and its options."""
    from .review import check_review_output

    out, options = kw.pop("review_out"), REVIEW.pop(kw)
    if out is None:
        return None
    check_review_output(out)
    return out, options


def _write_review(result: Any, target: tuple[Any, ReviewOptions] | None) -> None:
    if target is not None:
        from .review import review_result

        _report_review(review_result(result, *target))


def _report_review(written: Any) -> None:
    for warning in written.warnings:
        click.echo(f"imgsim: warning: {warning}", err=True)
    click.echo(written.summary())


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
    from .demo import run_demo, verdict

    result = run_demo(
        Path(workdir), ClusterOptions(workers=workers), progress, on_serving=click.echo
    )
    _print_match(result, show=len(result.pairs))
    click.echo(verdict(result))
    from .review import review_result

    _report_review(review_result(result, Path(workdir) / "review.html"))
    click.echo(
        f"next: {workdir}/uploads.csv and catalogue.csv list the images' paths, to try commands "
        f"on (imgsim run {workdir}/uploads.csv {workdir}/catalogue.csv --model "
        "efficientnet-lite0); the demo's own URLs worked only while it served them"
    )


def _print_match(result: Any, show: int = 10) -> None:
    table = result.pairs
    if len(table) and show:
        click.echo(table[result.preview].head(show).to_string(index=False))
        if result.pair_count > min(show, len(table)):
            shown = min(show, len(table))
            which = f"{shown}" if result.complete else f"the {shown} most similar"
            rest = "; --out FILE writes them all" if result.path is None else ""
            click.echo(f"(showing {which} of {result.pair_count} pairs{rest})")
    click.echo(result.decision())
    click.echo(result.summary())


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
    except RuntimeError as exc:
        # a Ctrl-C inside threading's Condition.wait can leave its lock half released, and
        # the wait then fails with "release unlocked lock" while handling the interrupt
        if not isinstance(exc.__context__, KeyboardInterrupt):
            raise
        click.echo("imgsim: interrupted", err=True)
        sys.exit(130)
