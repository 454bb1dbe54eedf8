"""The `imgsim` command line: a thin layer over the Python API that owns the terminal."""

from __future__ import annotations

import logging
import os
import sys

import click

from .errors import ImgsimError
from .accel import SCORERS
from .runtime import RUNTIMES
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


def _options(*decorators):
    """Apply click options in the order they read."""
    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command
    return apply


csv_options = _options(
    click.option("--delimiter", default=",", show_default=True, help="CSV field delimiter."),
    click.option("--no-header", is_flag=True, help="The CSV has no header row."),
    click.option("--cols", help="Columns to keep, comma-separated (with --no-header: names for "
                                "all)."),
    click.option("--url-col", help="Column holding the image URL or path [default: last kept "
                                   "column]."),
    click.option("--id-col", help="Column identifying a row [default: first kept column]."),
)
model_options = _options(
    click.option("--model", default="mobilenet", show_default=True,
                  type=click.Choice(["mobilenet", "efficientnet-lite0"])),
    click.option("--weights", help="Weights file, or 'random' (tests/benchmarks only)."),
    click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1)),
    click.option("--runtime", default="auto", show_default=True,
                 type=click.Choice(RUNTIMES),
                 help="What runs the model: auto is keras where TensorFlow sees a GPU, else "
                      "openvino (about 2x keras on CPU, same float32 features)."),
    click.option("--partition-rows", default=256, show_default=True, type=click.IntRange(1),
                 help="Rows per partition (and per Zarr chunk)."),
    click.option("--fetch-threads", default=64, show_default=True, type=click.IntRange(1),
                 help="Concurrent downloads per fetch worker process."),
    click.option("--timeout", default=20.0, show_default=True, type=click.FloatRange(0.1),
                 help="Read timeout per request, seconds."),
    click.option("--deadline", default=60.0, show_default=True, type=click.FloatRange(0.1),
                 help="Total time per image (connects, retries, redirects, body), seconds."),
    click.option("--schemes", default="http,https,file", show_default=True,
                 help="URL schemes to fetch (local paths count as file); others are blocked."),
    click.option("--public-only", is_flag=True,
                 help="Also refuse loopback and private addresses (for URLs from the open web)."),
    click.option("--allow-link-local", is_flag=True,
                 help="Allow link-local and cloud metadata addresses (refused by default)."),
    click.option("--overwrite", is_flag=True, help="Replace an existing source of this name."),
    click.option("--resume", is_flag=True, help="Continue an interrupted extraction of this "
                                                "name: written partitions are kept."),
    click.option("--retry-failed", is_flag=True,
                 help="Fetch again the rows of a source whose failure was transient (timeout, "
                      "5xx, 429, connection errors), and only those; the other rows stay as "
                      "they are, and an interrupted source is finished too."),
    click.option("--progress/--no-progress", default=True, show_default=True),
)
cluster_options = _options(
    click.option("--scheduler", help="Dask scheduler address [default: "
                                     "$DASK_SCHEDULER_ADDRESS, else a local cluster]."),
    click.option("--scheduler-file", type=click.Path(dir_okay=False),
                 help="Scheduler file written by `dask scheduler --scheduler-file`."),
    click.option("--workers", type=click.IntRange(1), help="Fetch workers of the local cluster."),
    click.option("--tls-ca-file", metavar="PATH",
                 help="CA certificate (PEM) of a tls:// cluster."),
    click.option("--tls-cert", metavar="PATH", help="Client certificate (PEM) signed by that CA."),
    click.option("--tls-key", metavar="PATH",
                 help="Client private key (PEM) [default: inside --tls-cert]."),
    click.option("--wait-workers", default=0.0, show_default=True, type=click.FloatRange(0),
                 metavar="SECONDS", help="Wait this long for a GPU worker to join a remote cluster."),
    click.option("--report", type=click.Path(dir_okay=False),
                 help="Write Dask's performance report (HTML) to this file."),
)
match_options = _options(
    click.option("--thresh", "threshold", type=float,
                 help="Keep pairs with similarity >= THRESH [default: the model's, 0.845 for "
                      "mobilenet; none with --top-k between two sources]."),
    click.option("--top-k", type=click.IntRange(1), help="Keep the K best matches per row."),
    click.option("--max-pairs", type=click.IntRange(1),
                 help="Stop early if the estimated pair count exceeds this."),
    click.option("--out", type=click.Path(), help="Result table: .parquet, .csv or a directory."),
    click.option("--scorer", default="auto", show_default=True, type=click.Choice(SCORERS),
                 help="What scores on the GPU workers: auto is keras (Keras ops on the GPU) "
                      "where the worker sees a GPU, else numpy."),
)


def _csv_kwargs(kw: dict) -> dict:
    """Pop the CSV options; `--delimiter '\\t'` means a tab."""
    delimiter = kw.pop("delimiter")
    return {"delimiter": "\t" if delimiter == "\\t" else delimiter,
            "header": not kw.pop("no_header"), "cols": _split(kw.pop("cols")),
            "url_col": kw.pop("url_col"), "id_col": kw.pop("id_col")}


def _cluster_options(kw: dict):
    """Pop the cluster options; two that name a scheduler (or one and --workers) conflict."""
    from .cluster import ClusterOptions

    if kw["scheduler"] and kw["scheduler_file"]:
        raise click.UsageError("--scheduler and --scheduler-file both name a scheduler; pass one")
    if kw["workers"] and (kw["scheduler"] or kw["scheduler_file"]):
        raise click.UsageError("--workers sizes the local cluster; a remote scheduler's cluster "
                               "has its own workers: drop --workers")
    return ClusterOptions(
        scheduler=kw.pop("scheduler"), scheduler_file=kw.pop("scheduler_file"),
        workers=kw.pop("workers"), tls_ca_file=kw.pop("tls_ca_file"),
        tls_cert=kw.pop("tls_cert"), tls_key=kw.pop("tls_key"),
        wait_workers=kw.pop("wait_workers"), report=kw.pop("report"))


def _extract_options(kw: dict):
    from .driver import ExtractOptions
    from .fetch import FetchOptions

    schemes = _split(kw.pop("schemes"))
    if not schemes:
        raise click.BadParameter("name at least one scheme (http, https, file)",
                                 param_hint="'--schemes'")
    return ExtractOptions(
        model=kw.pop("model"), weights=kw.pop("weights"), batch_size=kw.pop("batch_size"),
        runtime=kw.pop("runtime"), partition_rows=kw.pop("partition_rows"),
        overwrite=kw.pop("overwrite"), resume=kw.pop("resume"),
        retry_failed=kw.pop("retry_failed"),
        fetch=FetchOptions(threads=kw.pop("fetch_threads"), read_timeout=kw.pop("timeout"),
                           deadline=kw.pop("deadline"), schemes=tuple(schemes),
                           public_only=kw.pop("public_only"),
                           allow_link_local=kw.pop("allow_link_local")),
        progress=kw.pop("progress"),
    )


@cli.command()
@click.argument("csv", type=str)
@click.option("--name", required=True, help="Name of the source in the store.")
@store_option
@csv_options
@model_options
@cluster_options
def extract(csv, name, store, **kw):
    """Extract CNN features for every row of CSV into STORE/NAME."""
    from .driver import extract as run_extract

    csv_kwargs = _csv_kwargs(kw)
    source = run_extract(csv, name, store, cluster_options=_cluster_options(kw),
                         options=_extract_options(kw), **csv_kwargs)
    _print_summary(source)


def _print_summary(source) -> None:
    meta = source.meta
    counts = ", ".join(f"{k} {v}" for k, v in meta["status_counts"].items())
    click.echo(f"{meta['name']}: {meta['rows']} rows ({counts}) in {meta['seconds']:.1f} s, "
               f"{meta['images_per_second']} images/s -> {source.path}")
    if meta["rows"] and not meta["status_counts"].get("ok"):
        status, count = max(meta["status_counts"].items(), key=lambda item: item[1])
        hint = f"; is {meta['url_col']!r} the column of URLs? (--url-col)" \
            if status in ("not_found", "bad_url") else ""
        click.echo(f"imgsim: warning: no row gave an image ({count} {status}){hint}", err=True)
    stages = meta.get("stages")
    if stages:
        fetch, embed = stages["fetch"], stages["embed"]
        click.echo(f"  fetch {fetch['task_seconds']:.1f} task-s ({fetch['rows_per_task_second']} "
                   f"rows/s per task), embed {embed['task_seconds']:.1f} task-s "
                   f"({embed['images_per_task_second']} images/s per task)")


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
              help="HDF5 file to write (.h5, dataset 'data'); the fields go beside it in "
                   "STEM_fields.csv, tab-separated as the original's.")
def export(name, store, h5_path):
    """Export a source in the original's layout: HDF5 features of the ok rows + their fields."""
    from .store import open_store

    h5, fields = open_store(store, name).export_h5(h5_path)
    click.echo(f"wrote {h5} and {fields}")


@cli.command()
@click.argument("name1")
@click.argument("name2")
@store_option
@match_options
@cluster_options
def match(name1, name2, store, **kw):
    """Match source NAME1 against NAME2 (the same name: near-duplicates within it)."""
    from .pairs import match_sources

    cluster = _cluster_options(kw)  # the rest of kw are match options
    _print_match(match_sources(name1, name2, store, cluster_options=cluster, **kw))


@cli.command()
@click.argument("name")
@store_option
@match_options
@cluster_options
def dedupe(name, store, **kw):
    """Find near-duplicate groups within one source (each pair once, with a group id)."""
    from .pairs import match_sources

    cluster = _cluster_options(kw)  # the rest of kw are match options
    _print_match(match_sources(name, name, store, cluster_options=cluster, **kw))


@cli.command()
@click.argument("csv1")
@click.argument("csv2", required=False)
@click.option("--names", metavar="NAME1[,NAME2]",
              help="Names of the sources, one per CSV [default: the CSV file stems].")
@store_option
@csv_options
@model_options
@match_options
@cluster_options
def run(csv1, csv2, names, store, threshold, top_k, max_pairs, out, scorer, **kw):
    """Extract CSV1 and CSV2 (reusing complete sources) and match them; one CSV: dedupe it."""
    from .workflow import run as run_job

    csv_kwargs = _csv_kwargs(kw)
    result = run_job(csv1, csv2, _split(names), store, out=out,
                     threshold=threshold, top_k=top_k, max_pairs=max_pairs, scorer=scorer,
                     cluster_options=_cluster_options(kw), csv_options=csv_kwargs,
                     options=_extract_options(kw))
    _print_match(result)


@cli.command()
@click.option("--dir", "workdir", default="imgsim-demo", show_default=True,
              type=click.Path(file_okay=False), help="Where the demo writes images and results.")
@click.option("--workers", type=click.IntRange(1), help="Fetch workers of the local cluster.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def demo(workdir, workers, progress):
    """Offline demo: serve sample photos and edited copies on 127.0.0.1, extract, match."""
    from pathlib import Path

    from .demo import serve_directory, write_csvs
    from .driver import ExtractOptions
    from .models import get_spec
    from .workflow import run as run_job

    root = Path(workdir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    with serve_directory(root / "images") as base_url:
        catalogue, uploads = write_csvs(root, base_url)
        click.echo(f"serving {len(list((root / 'images').iterdir()))} demo images at {base_url}")
        options = ExtractOptions(model="efficientnet-lite0", partition_rows=8, batch_size=8,
                                 overwrite=True, progress=progress)
        result = run_job(str(uploads), str(catalogue), ["uploads", "catalogue"],
                         str(root / "store"), out=root / "matches.csv", top_k=1,
                         threshold=get_spec(options.model).threshold, workers=workers,
                         options=options)
    _print_match(result, show=len(result.pairs))


def _print_match(result, show: int = 10) -> None:
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
    except ImgsimError as exc:
        click.echo(f"imgsim: error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo("imgsim: interrupted", err=True)
        sys.exit(130)
