"""Workflow: the one-command job, extract two CSVs (skipping complete sources) then match them."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from .cluster import Cluster, connect
from .driver import adopt_plan, extract_on, is_small, reuse_complete
from .ingest import CsvFile, inspect_csv
from .models import Weights, resolve_weights
from .options import (
    DEFAULT_STORE,
    CsvOptions,
    ExtractOptions,
    MatchOptions,
    OptionError,
    opt,
    set_fields,
    with_overrides,
)
from .pairs import MatchResult, check_output, match_sources
from .store import (
    PLAN,
    PlanMismatch,
    check_name,
    check_store,
    check_writable,
    store_path,
)


def default_names(csvs: list[str]) -> list[str]:
    """Source names from CSV file stems, made distinct."""
    stems = [Path(c).stem or "source" for c in csvs]
    if len(stems) == 2 and stems[0] == stems[1]:
        stems = [f"{stems[0]}1", f"{stems[1]}2"]
    return stems


def run(
    csv1: str,
    csv2: str | None = None,
    names: list[str] | None = None,
    store: str = DEFAULT_STORE,
    *,
    out: str | os.PathLike | None = None,
    cluster: Cluster = None,
    csv_options: CsvOptions | None = None,
    options: ExtractOptions | None = None,
    match_options: MatchOptions | None = None,
    **fields: Any,
) -> MatchResult:
    """Extract `csv1` (and `csv2`), then match them; one CSV is matched against itself.

    A source already in the store is reused as it is, or continued if interrupted (as with
    `resume`), with the options it was made with; an option given that differs, or a CSV
    that changed, is an error unless `overwrite` is set. A new source takes the model and
    weights of a stored one unless they are given. `url_col` and `id_col` may name one
    column per CSV (`"image_url,url"`). Keyword arguments named like fields of the three
    option classes override them.
    """
    options, csv_options, match_options = with_overrides(
        fields,
        options or ExtractOptions(),
        csv_options or CsvOptions(),
        match_options or MatchOptions(),
    )
    if options.append:
        raise OptionError(f"{opt('append')} adds one CSV to a source: use extract")
    if not options.overwrite:
        options = replace(options, resume=True)
    check_store(store)
    csvs = [csv1] + ([csv2] if csv2 else [])
    names = list(names) if names else default_names(csvs)
    if len(names) != len(csvs):
        raise OptionError(f"{opt('names')} needs {len(csvs)} name(s), got {len(names)}")
    if len(set(names)) != len(names):
        raise OptionError(f"{opt('names')} must differ, got {', '.join(names)}")
    if out is not None:
        check_output(out, tuple(csvs))
    given = set(fields) | set_fields(options, csv_options)
    jobs = []
    for csv, name, per_csv in zip(csvs, names, csv_options_per_csv(csv_options, len(csvs))):
        check_name(name)  # both inputs are checked before any work starts
        made = adopt_plan(store_path(store) / name, options, per_csv, given)
        jobs.append((csv, name, *made))
    jobs = _same_model(jobs, store, given)
    csv_files = [_inspect(csv, per_csv, len(csvs)) for csv, _, _, per_csv in jobs]
    # a complete source made with these options is reused, without resolving its weights
    todo = []
    for csv_file, (_, name, source_options, _) in zip(csv_files, jobs):
        try:
            reused = reuse_complete(csv_file, name, store, source_options, given)
        except PlanMismatch as exc:
            raise _per_csv_hint(exc, len(csvs)) from None
        if reused is None:
            todo.append((csv_file, name, source_options))
    if todo:
        check_writable(store)
    resolved: dict[tuple[str, str | None], Weights] = {}
    for _, _, source_options in todo:
        key = (source_options.model, source_options.weights)
        if key not in resolved:
            resolved[key] = resolve_weights(*key)
    if not todo:  # the match alone: it decides where it runs (a small one runs here)
        return match_sources(
            names[0], names[-1], store, out=out, cluster=cluster, options=match_options
        )
    with connect(cluster, small=all(is_small(f) for f in csv_files)) as active:
        for csv_file, name, source_options in todo:
            weights = resolved[(source_options.model, source_options.weights)]
            try:
                extract_on(active, csv_file, name, store, source_options, weights)
            except PlanMismatch as exc:
                raise _per_csv_hint(exc, len(csvs)) from None
        return match_sources(
            names[0], names[-1], store, out=out, cluster=active, options=match_options
        )


PER_CSV = ("url_col", "id_col")  # options `run` takes one per CSV, comma-separated


def csv_options_per_csv(csv_options: CsvOptions, count: int) -> list[CsvOptions]:
    """The CSV options of each of `count` CSVs: `url_col` and `id_col` may name one column
    per CSV, comma-separated (`image_url,url`); one name applies to all."""
    per_csv = [csv_options] * count
    for key in PER_CSV:
        value = getattr(csv_options, key)
        if value is None or "," not in value:
            continue
        names = [part.strip() for part in value.split(",")]
        if len(names) != count or not all(names):
            raise OptionError(
                f"{opt(key)} {value!r}: give one column for all CSVs, or one per CSV "
                f"({count}), comma-separated"
            )
        per_csv = [replace(o, **{key: column}) for o, column in zip(per_csv, names)]
    return per_csv


def _same_model(jobs: list, store: str, given: set[str]) -> list:
    """A source to be made anew takes the model, weights, descriptor and input size of the
    other, stored one when the caller named none of them, so that the two can be matched."""
    made = [options for _, name, options, _ in jobs if (store_path(store) / name / PLAN).is_file()]
    how = ("model", "weights", "descriptor", "image_size")
    if not made or given & set(how):
        return jobs
    taken = {key: getattr(made[0], key) for key in how}
    return [
        (csv, name, options, per_csv)
        if (store_path(store) / name / PLAN).is_file()
        else (csv, name, replace(options, **taken), per_csv)
        for csv, name, options, per_csv in jobs
    ]


def _inspect(csv: str, csv_options: CsvOptions, count: int) -> CsvFile:
    """`inspect_csv`, whose column errors, with two CSVs, say that each may have its own."""
    try:
        return inspect_csv(csv, csv_options)
    except OptionError as exc:
        if count < 2 or not any(opt(key) in exc.template for key in PER_CSV):
            raise
        raise OptionError(
            f"{exc.template}; with two CSVs, name each one's column: "
            f"{opt('url_col')} A,B (and {opt('id_col')} A,B)"
        ) from None


def _per_csv_hint(exc: PlanMismatch, count: int) -> PlanMismatch:
    if count < 2 or exc.option not in PER_CSV:
        return exc
    return PlanMismatch(
        f"{exc.template} (with two CSVs, {opt(exc.option)} takes one per CSV: A,B)", exc.option
    )
