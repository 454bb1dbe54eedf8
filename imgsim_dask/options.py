"""Options: the one home of every option's default, check and help text.

One frozen dataclass per concern (`CsvOptions`, `FetchOptions`, `ExtractOptions`,
`MatchOptions`, `ClusterOptions`). A field made with `option(...)` carries its help text,
its bounds or choices and, where it differs from `--field-name`, its command-line flag; the
CLI generates its options from these fields (`cli.py`), so nothing is declared twice.
Checks run in `__post_init__` and raise `OptionError`, which names the API parameter
(`batch_size`) when read from Python and the flag (`--batch-size`) in the CLI.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .descriptor import DESCRIPTORS, Descriptor
from .errors import OptionError, opt
from .models import MODELS, get_spec

DEFAULT_STORE = "imgsim-store"
DEFAULT_MODEL = "mobilenet"  # as the original
RUNTIMES = ("auto", "openvino", "keras")
SCORERS = ("auto", "numpy", "keras")
SCHEMES = ("http", "https", "file")  # "file" covers file:// URLs and plain local paths
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit (MAX_IMAGE_PIXELS)
TASK_RETRIES = 2  # a task lost with its worker is recomputed elsewhere, this many times


def option(
    default: Any = None,
    help: str = "",
    *,
    flag: str | None = None,
    cli: bool = True,
    minimum: float | None = None,
    choices: tuple[str, ...] | None = None,
    list_of: bool = False,
    metavar: str | None = None,
    default_factory: Any = None,
) -> Any:
    """A dataclass field with what the checks and the CLI need to know about it.

    `flag`: the CLI flag when not `--field-name`; `cli=False`: API only; `minimum`: the
    smallest value allowed; `choices`: the values allowed; `list_of`: a tuple the CLI takes
    comma-separated.
    """
    metadata = {
        "help": help,
        "flag": flag,
        "cli": cli,
        "minimum": minimum,
        "choices": choices,
        "list_of": list_of,
        "metavar": metavar,
    }
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_of(spec: dataclasses.Field) -> str:
    """The command-line flag of an option field."""
    return spec.metadata.get("flag") or "--" + spec.name.replace("_", "-")


def _check_fields(options: Any) -> None:
    """Check every option field's type, bounds and choices against its declaration."""
    for spec in dataclasses.fields(options):
        value, meta = getattr(options, spec.name), spec.metadata
        if value is None or not meta:
            continue
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise OptionError(
                f"unknown {opt(spec.name)} {value!r}; choose one of: {', '.join(meta['choices'])}"
            )
        minimum = meta.get("minimum")
        if minimum is None:
            continue
        integer = str(spec.type).startswith("int")
        if integer and not _is_int(value):
            raise OptionError(
                f"{opt(spec.name)} must be an integer of at least {minimum:g}, got {value!r}"
            )
        if (
            not isinstance(value, (int, float, np.number))
            or isinstance(value, bool)
            or not value >= minimum
        ):
            kind = "an integer" if integer else "a number"
            raise OptionError(
                f"{opt(spec.name)} must be {kind} of at least {minimum:g}, got {value!r}"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _freeze(options: Any, name: str, value: Any) -> None:
    object.__setattr__(options, name, value)


@dataclass(frozen=True)
class CsvOptions:
    """How to read the input CSV and which of its columns matter."""

    delimiter: str = option(",", "CSV field delimiter ('\\t': a tab).")
    header: bool = option(True, "The CSV has no header row.", flag="--no-header")
    cols: tuple[str, ...] | None = option(
        None, "Columns to keep, comma-separated (with --no-header: names for all).", list_of=True
    )
    url_col: str | None = option(
        None, "Column holding the image URL or path [default: last kept column]."
    )
    id_col: str | None = option(None, "Column identifying a row [default: first kept column].")

    def __post_init__(self) -> None:
        if self.delimiter == "\\t":
            _freeze(self, "delimiter", "\t")
        if len(self.delimiter) != 1:
            raise OptionError(f"{opt('delimiter')} must be one character, got {self.delimiter!r}")
        if self.cols is not None:
            _freeze(self, "cols", tuple(self.cols) or None)


@dataclass(frozen=True)
class FetchOptions:
    """How images are fetched and decoded (times in seconds)."""

    threads: int = option(
        64, "Concurrent downloads per fetch worker process.", flag="--fetch-threads", minimum=1
    )
    connect_timeout: float = option(5.0, "Connect timeout per request.", cli=False, minimum=0.001)
    read_timeout: float = option(
        20.0, "Read timeout per request, seconds.", flag="--timeout", minimum=0.1
    )
    deadline: float = option(
        60.0, "Total time per image (connects, retries, redirects, body), seconds.", minimum=0.1
    )
    retries: int = option(
        2, "Retries for 429, 500/502/503/504 and connection resets.", cli=False, minimum=0
    )
    backoff: float = option(
        0.5, "First retry delay, doubled for each further retry.", cli=False, minimum=0
    )
    max_retry_after: float = option(
        10.0, "A longer Retry-After is not waited for: the row fails.", cli=False, minimum=0
    )
    max_redirects: int = option(5, "Redirects followed per image.", cli=False, minimum=0)
    max_bytes: int = option(32 * 2**20, "Largest image body read.", cli=False, minimum=1)
    max_pixels: int = option(
        DEFAULT_MAX_PIXELS, "Larger images are refused as `bomb`.", cli=False, minimum=1
    )
    schemes: tuple[str, ...] = option(
        SCHEMES,
        "URL schemes to fetch (local paths count as file); others are blocked.",
        list_of=True,
    )
    public_only: bool = option(
        False, "Also refuse loopback and private addresses (for URLs from the open web)."
    )
    allow_link_local: bool = option(
        False, "Allow link-local and cloud metadata addresses (refused by default)."
    )
    root: str = option(
        "", "When set, local paths must resolve to a file under this directory.", cli=False
    )
    thumbnails: bool = option(
        True,
        "Store a small JPEG of each ok row in the source, for `imgsim review`.",
        flag="--thumbnails/--no-thumbnails",
    )
    # set by the extraction from its options (`ExtractOptions.resolved_image_size`), its
    # descriptor and the CSV
    image_size: int = option(
        get_spec(DEFAULT_MODEL).image_size, "Model input size.", cli=False, minimum=1
    )
    trim_borders: bool = option(
        False, "Cut uniform borders off before the resize (the descriptor's).", cli=False
    )
    base_dir: str = option("", "Relative local paths are resolved against this.", cli=False)

    def __post_init__(self) -> None:
        _check_fields(self)
        schemes = tuple(self.schemes)
        if not schemes:
            raise OptionError(f"{opt('schemes')}: name at least one scheme (http, https, file)")
        unknown = set(schemes) - set(SCHEMES)
        if unknown:
            raise OptionError(
                f"{opt('schemes')}: unsupported scheme(s) {sorted(unknown)}; choose from {SCHEMES}"
            )
        if self.public_only:  # like allow_link_local, an allowance never lifts public_only
            schemes = tuple(scheme for scheme in schemes if scheme != "file")
            if not schemes:
                raise OptionError(
                    f"{opt('public_only')} refuses local files, so "
                    f"{opt('schemes')} file leaves nothing to fetch; allow "
                    f"http/https, or drop {opt('public_only')}"
                )
        _freeze(self, "schemes", schemes)


@dataclass(frozen=True)
class ExtractOptions:
    """Everything that shapes an extraction besides its input and output."""

    model: str = option(
        DEFAULT_MODEL, "Model that turns images into features.", choices=tuple(MODELS)
    )
    weights: str | None = option(None, "Weights file, or 'random' (tests/benchmarks only).")
    descriptor: str | None = option(
        None,
        "How the model's last feature map becomes the stored vector: avg (average pooling, "
        "as the original), gem, rmac (regional GeM), rmac-trim (uniform borders trimmed "
        "first) [default: the model's: avg for mobilenet, rmac-trim for efficientnet-lite0].",
        choices=tuple(DESCRIPTORS),
    )
    image_size: int | None = option(
        None,
        "Model input, pixels a side: smaller is faster (160 takes half the model time of "
        "224, docs/accuracy.md); sources of different sizes do not match [default: the "
        "model's: 224 for mobilenet, 160 for efficientnet-lite0].",
        minimum=32,
        metavar="PIXELS",
    )
    batch_size: int = option(64, "Images per model call.", minimum=1)
    runtime: str = option(
        "auto",
        "What runs the model: auto is keras where TensorFlow sees a GPU, else "
        "openvino (about 2x keras on CPU, same float32 features).",
        choices=RUNTIMES,
    )
    partition_rows: int = option(256, "Rows per partition (and per Zarr chunk).", minimum=1)
    fetch: FetchOptions = option(default_factory=FetchOptions)
    overwrite: bool = option(False, "Replace an existing source of this name.")
    resume: bool = option(
        False, "Continue an interrupted extraction of this name: written partitions are kept."
    )
    retry_failed: bool = option(
        False,
        "Fetch again the rows of a source whose failure was transient (timeout, 5xx, "
        "429, connection errors), and only those; the other rows stay as they are, and "
        "an interrupted source is finished too.",
    )
    append: bool = option(
        False,
        "Add the CSV's rows to the source of this name (ids continue, with the options it "
        "was made with); match then with --new-only. Run an interrupted append again to "
        "finish it.",
    )
    progress: bool = option(
        True, "Show progress bars (in a terminal only).", flag="--progress/--no-progress"
    )

    def resolved_descriptor(self) -> Descriptor:
        """The descriptor asked for, or the model's default."""
        return DESCRIPTORS[self.descriptor or get_spec(self.model).default_descriptor]

    def resolved_image_size(self) -> int:
        """The input size asked for, or the model's."""
        return self.image_size or get_spec(self.model).image_size

    def __post_init__(self) -> None:
        if isinstance(self.fetch, dict):
            _freeze(self, "fetch", FetchOptions(**self.fetch))
        _check_fields(self)
        if self.overwrite and (self.resume or self.retry_failed):
            raise OptionError(
                f"{opt('overwrite')} excludes {opt('resume')} and {opt('retry_failed')}"
            )
        if self.append and (self.overwrite or self.resume or self.retry_failed):
            raise OptionError(
                f"{opt('append')} excludes {opt('overwrite')}, {opt('resume')} and "
                f"{opt('retry_failed')} (run an interrupted append again to finish it)"
            )


@dataclass(frozen=True)
class MatchOptions:
    """What to keep and how to cut the work.

    `block_rows` rows of A per task against slices of `slice_rows` rows of B: a task needs
    about `block_rows * slice_rows * 5` bytes besides its inputs (40 MiB by default).
    `threads` (default: the CPUs this process may use; on a cluster, each scoring worker's
    share of its host's CPUs) split a block's rows inside a task;
    each thread runs its own sgemm, so the kernel uses every core even where BLAS is limited
    to one thread (Dask's nanny sets OPENBLAS_NUM_THREADS=1 in workers). `max_pairs` stops a
    run before scoring when the estimated pair count exceeds it. `scorer` picks the kernel
    on each scoring worker (see `match.device`).
    """

    threshold: float | None = option(
        None,
        "Keep pairs with similarity >= THRESH [default: the model's, 0.845 for "
        "mobilenet; none with --top-k between two sources].",
        flag="--thresh",
    )
    top_k: int | None = option(None, "Keep the K best matches per row.", minimum=1)
    block_rows: int = option(2048, "Rows of A per score task.", cli=False, minimum=1)
    slice_rows: int = option(4096, "Rows of B per slice.", cli=False, minimum=1)
    max_pairs: int | None = option(
        None, "Stop early if the estimated pair count exceeds this.", minimum=0
    )
    threads: int | None = option(None, "Threads per score task.", cli=False, minimum=1)
    new_only: bool = option(
        False,
        "Score only the rows added (--append) to either source since the last run into "
        "the --out DIR/ dataset, and add their pairs to it.",
    )
    scorer: str = option(
        "auto",
        "What scores on the GPU workers: auto is keras (Keras ops on the GPU) where "
        "the worker sees a GPU, else numpy.",
        choices=SCORERS,
    )

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.threshold is not None and not (-1.0 <= float(self.threshold) <= 1.0):
            raise OptionError(
                f"{opt('threshold')} {self.threshold} is outside [-1, 1] (cosine similarity)"
            )


@dataclass(frozen=True)
class ReviewOptions:
    """What the review page of a match shows (`imgsim review`, `--review`)."""

    max_pairs_shown: int = option(
        2000,
        "Pairs on the page at most: the most similar, the borderline band around the "
        "threshold, and a random sample (the full table stays in the pairs file).",
        minimum=1,
    )


@dataclass(frozen=True)
class ClusterOptions:
    """Where a job runs and how it is watched.

    `scheduler` (an address) or `scheduler_file` name a remote cluster, else
    `DASK_SCHEDULER_ADDRESS`, else a local cluster with `workers` fetch workers. The three
    `tls_*` files are the client's CA, certificate and key for a `tls://` scheduler.
    """

    scheduler: str | None = option(
        None, "Dask scheduler address [default: $DASK_SCHEDULER_ADDRESS, else a local cluster]."
    )
    scheduler_file: str | None = option(
        None, "Scheduler file written by `dask scheduler --scheduler-file`."
    )
    workers: int | None = option(None, "Fetch workers of the local cluster.", minimum=1)
    tls_ca_file: str | None = option(
        None, "CA certificate (PEM) of a tls:// cluster.", metavar="PATH"
    )
    tls_cert: str | None = option(
        None, "Client certificate (PEM) signed by that CA.", metavar="PATH"
    )
    tls_key: str | None = option(
        None, "Client private key (PEM) [default: inside --tls-cert].", metavar="PATH"
    )
    wait_workers: float = option(
        0.0,
        "Wait this long for a GPU worker to join a remote cluster.",
        minimum=0,
        metavar="SECONDS",
    )
    report: str | None = option(None, "Write Dask's performance report (HTML) to this file.")
    dashboard_address: str = option(
        "127.0.0.1:8787",
        "Where the local cluster's dashboard listens (:0 picks a free port).",
        metavar="HOST:PORT",
    )
    keep_cluster: float = option(
        0.0,
        "Keep the local cluster and its dashboard up this long after the job (Ctrl-C ends it).",
        minimum=0,
        metavar="SECONDS",
    )

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.scheduler and self.scheduler_file:
            raise OptionError(
                f"{opt('scheduler')} and {opt('scheduler_file')} both name a scheduler; pass one"
            )
        if self.workers and (self.scheduler or self.scheduler_file):
            raise OptionError(
                f"{opt('workers')} sizes the local cluster; a remote "
                f"scheduler's cluster has its own workers: drop {opt('workers')}"
            )


OPTION_CLASSES = (
    CsvOptions,
    FetchOptions,
    ExtractOptions,
    MatchOptions,
    ReviewOptions,
    ClusterOptions,
)


def with_overrides(fields: dict[str, Any], *options: Any) -> tuple[Any, ...]:
    """Copies of the option objects with `fields` replaced, each field in the object that
    has it (and checked again there); a name none has is a TypeError, as for a function."""
    unknown = set(fields) - {f.name for o in options for f in dataclasses.fields(o)}
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    return tuple(
        dataclasses.replace(
            o, **{f.name: fields[f.name] for f in dataclasses.fields(o) if f.name in fields}
        )
        for o in options
    )


def set_fields(*options: Any) -> set[str]:
    """Names of the fields (of nested option objects too) whose values differ from their
    defaults: what a caller asked for, as far as the objects can tell."""
    found = set()
    for o in options:
        for spec in dataclasses.fields(o):
            value = getattr(o, spec.name)
            if dataclasses.is_dataclass(value):
                found |= set_fields(value)
                continue
            if value != spec.default:
                found.add(spec.name)
    return found
