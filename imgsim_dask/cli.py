"""The `imgsim` command line: a thin layer over the Python API that owns the terminal."""

from __future__ import annotations

import logging
import os
import sys

import click

from .errors import ImgsimError
from .store import DEFAULT_STORE

EXIT_USAGE = 2

store_option = click.option("--store", default=DEFAULT_STORE, show_default=True,
                            type=click.Path(file_okay=False), help="Feature store directory.")


def _split(value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="imgsim-dask")
@click.option("-v", "--verbose", is_flag=True, help="Show debug logs.")
def cli(verbose: bool) -> None:
    """Find similar and near-duplicate images across huge collections of image URLs, on Dask."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("imgsim_dask").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@cli.command()
@click.argument("csv", type=str)
@click.option("--name", required=True, help="Name of the source in the store.")
@store_option
@click.option("--delimiter", default=",", show_default=True, help="CSV field delimiter.")
@click.option("--no-header", is_flag=True, help="The CSV has no header row.")
@click.option("--cols", help="Columns to keep, comma-separated (with --no-header: names for all).")
@click.option("--url-col", help="Column holding the image URL or path [default: last kept column].")
@click.option("--id-col", help="Column identifying a row [default: first column].")
@click.option("--model", default="mobilenet", show_default=True,
              type=click.Choice(["mobilenet", "efficientnet-lite0"]))
@click.option("--weights", help="Weights file, or 'random' (tests/benchmarks only).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--partition-rows", default=512, show_default=True, type=click.IntRange(1),
              help="Rows per partition (and per Zarr chunk).")
@click.option("--fetch-threads", default=16, show_default=True, type=click.IntRange(1),
              help="Concurrent downloads per fetch worker process.")
@click.option("--timeout", default=20.0, show_default=True, type=click.FloatRange(0.1),
              help="Read timeout per request, seconds.")
@click.option("--scheduler", help="Dask scheduler address [default: $DASK_SCHEDULER_ADDRESS, "
                                  "else a local cluster].")
@click.option("--workers", type=click.IntRange(1), help="Fetch workers of the local cluster.")
@click.option("--overwrite", is_flag=True, help="Replace an existing source of this name.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def extract(csv, name, store, delimiter, no_header, cols, url_col, id_col, model, weights,
            batch_size, partition_rows, fetch_threads, timeout, scheduler, workers, overwrite,
            progress):
    """Extract CNN features for every row of CSV into STORE/NAME."""
    from .driver import ExtractOptions, extract as run_extract
    from .fetch import FetchOptions

    if delimiter == "\\t":
        delimiter = "\t"
    options = ExtractOptions(
        model=model, weights=weights, batch_size=batch_size, partition_rows=partition_rows,
        fetch=FetchOptions(threads=fetch_threads, read_timeout=timeout), overwrite=overwrite,
        progress=progress,
    )
    source = run_extract(csv, name, store, scheduler=scheduler, workers=workers,
                         delimiter=delimiter, header=not no_header, cols=_split(cols),
                         url_col=url_col, id_col=id_col, options=options)
    _print_summary(source)


def _print_summary(source) -> None:
    meta = source.meta
    counts = ", ".join(f"{k} {v}" for k, v in meta["status_counts"].items())
    click.echo(f"{meta['name']}: {meta['rows']} rows ({counts}) in {meta['seconds']:.1f} s, "
               f"{meta['images_per_second']} images/s -> {source.path}")


@cli.command()
@click.argument("name")
@store_option
def info(name, store):
    """Show a stored source: counts by status, model, dimension."""
    from .store import open_store

    source = open_store(store, name)
    meta = source.meta
    click.echo(f"name      {meta['name']}\npath      {source.path}\nmodel     {meta['model']} "
               f"({meta['dim']}-d, weights: {meta['weights']})\nrows      {meta['rows']}")
    for status, count in source.status_counts().items():
        click.echo(f"  {status:<20} {count}")
    click.echo(f"csv       {meta['csv']} (url column {meta['url_col']!r})\n"
               f"extracted {meta['created']} in {meta['seconds']:.1f} s")


@cli.command()
@click.argument("name")
@store_option
@click.option("--h5", "h5_path", required=True, type=click.Path(dir_okay=False),
              help="HDF5 file to write (dataset 'data'); a tab-separated fields file goes beside it.")
def export(name, store, h5_path):
    """Export a source in the original's layout: HDF5 features of the ok rows + a fields TSV."""
    from .store import open_store

    h5, fields = open_store(store, name).export_h5(h5_path)
    click.echo(f"wrote {h5} and {fields}")


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("imgsim: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ImgsimError as exc:
        click.echo(f"imgsim: error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo("imgsim: interrupted", err=True)
        sys.exit(130)
