"""Workflow: the one-command job, extract two CSVs (skipping complete sources) then match them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from distributed import Client

from .cluster import ClusterOptions, connect
from .driver import ExtractOptions, extract
from .errors import InputError, StoreError
from .pairs import MatchResult, check_output_path, match_sources
from .store import DEFAULT_STORE, open_store

logger = logging.getLogger(__name__)


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
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    cluster_options: ClusterOptions | None = None,
    csv_options: dict | None = None,
    options: ExtractOptions | None = None,
) -> MatchResult:
    """Extract `csv1` (and `csv2`) unless already complete in the store, then match them.

    With one CSV the source is matched against itself (near-duplicates within it).
    """
    options = options or ExtractOptions()
    csvs = [csv1] + ([csv2] if csv2 else [])
    names = list(names) if names else default_names(csvs)
    if len(names) != len(csvs):
        raise InputError(f"--names needs {len(csvs)} name(s), got {len(names)}")
    if out is not None:
        check_output_path(out)
    with connect(scheduler, client, workers, cluster_options) as active:
        for csv, name in zip(csvs, names):
            if not (options.overwrite or options.resume) and _complete(store, name, options.model):
                logger.info("%s: already extracted in %s, skipping", name, store)
                continue
            extract(csv, name, store, client=active, options=options, **(csv_options or {}))
        return match_sources(names[0], names[-1], store, out=out, threshold=threshold,
                             top_k=top_k, max_pairs=max_pairs, client=active)


def _complete(store: str, name: str, model: str) -> bool:
    """True if `name` is a complete source of `model`; an incomplete one is an error to fix."""
    if not (Path(store) / name).exists():
        return False
    source = open_store(store, name)
    if source.meta["model"] != model:
        raise StoreError(f"source {name!r} in {store} was extracted with "
                         f"{source.meta['model']}, not {model}; pass --overwrite to redo it")
    return True
