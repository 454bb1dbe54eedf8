"""Workflow: the one-command job, extract two CSVs (skipping complete sources) then match them."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from .cluster import Cluster, connect
from .driver import extract_on, reuse_complete
from .ingest import inspect_csv
from .models import resolve_weights
from .options import (
    DEFAULT_STORE,
    CsvOptions,
    ExtractOptions,
    MatchOptions,
    OptionError,
    opt,
    with_overrides,
)
from .pairs import MatchResult, check_output_path, match_sources
from .store import check_name, check_store


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

    A source already in the store from the same CSV and options is reused as it is (an
    interrupted one is continued, as with `--resume`); one from a different CSV or model
    is an error unless `overwrite` is set. Keyword arguments named like fields of the
    three option classes override them.
    """
    options, csv_options, match_options = with_overrides(
        fields,
        options or ExtractOptions(),
        csv_options or CsvOptions(),
        match_options or MatchOptions(),
    )
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
        check_output_path(out, tuple(csvs))
    csv_files = []
    for csv, name in zip(csvs, names):  # both inputs are checked before any work starts
        check_name(name)
        csv_files.append(inspect_csv(csv, csv_options))
    # a complete source made with these options is reused, without resolving its weights
    todo = [
        (csv_file, name)
        for csv_file, name in zip(csv_files, names)
        if reuse_complete(csv_file, name, store, options) is None
    ]
    weights = resolve_weights(options.model, options.weights) if todo else None
    with connect(cluster) as active:
        for csv_file, name in todo:
            assert weights is not None
            extract_on(active, csv_file, name, store, options, weights)
        return match_sources(
            names[0], names[-1], store, out=out, cluster=active, options=match_options
        )
