"""Workflow: the one-command job, extract two CSVs (skipping complete sources) then match them."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from distributed import Client

from .accel import check_scorer
from .cluster import ClusterOptions, connect
from .driver import ExtractOptions, extract
from .errors import InputError
from .ingest import inspect_csv
from .pairs import MatchResult, check_output_path, match_sources
from .store import DEFAULT_STORE, check_name


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
    threshold: float | None = None,
    top_k: int | None = None,
    max_pairs: int | None = None,
    scorer: str = "auto",
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    cluster_options: ClusterOptions | None = None,
    csv_options: dict | None = None,
    options: ExtractOptions | None = None,
) -> MatchResult:
    """Extract `csv1` (and `csv2`), then match them; one CSV is matched against itself.

    A source already in the store from the same CSV and options is reused as it is (an
    interrupted one is continued, as with `--resume`); one from a different CSV or model
    is an error unless `overwrite` is set.
    """
    options = options or ExtractOptions()
    if not options.overwrite:
        options = replace(options, resume=True)
    csvs = [csv1] + ([csv2] if csv2 else [])
    names = list(names) if names else default_names(csvs)
    if len(names) != len(csvs):
        raise InputError(f"--names needs {len(csvs)} name(s), got {len(names)}")
    if len(set(names)) != len(names):
        raise InputError(f"--names must differ, got {', '.join(names)}")
    if out is not None:
        check_output_path(out, tuple(csvs))
    check_scorer(scorer)
    for csv, name in zip(csvs, names):  # both inputs are checked before any work starts
        check_name(name)
        inspect_csv(csv, **(csv_options or {}))
    with connect(scheduler, client, workers, cluster_options) as active:
        for csv, name in zip(csvs, names):
            extract(csv, name, store, client=active, options=options, **(csv_options or {}))
        return match_sources(names[0], names[-1], store, out=out, threshold=threshold,
                             top_k=top_k, max_pairs=max_pairs, scorer=scorer,
                             client=active)
