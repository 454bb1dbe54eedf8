"""imgsim-dask: find similar and near-duplicate images across huge collections, on Dask.

The names below are imported when first used, so a process that needs one module (a worker
loading `imgsim_dask.workerinit`) does not pay for all of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .about import VERSION

if TYPE_CHECKING:
    from .driver import extract
    from .embeddings import import_features
    from .errors import ImgsimError
    from .match import match_features
    from .options import ClusterOptions, CsvOptions, ExtractOptions, FetchOptions, MatchOptions
    from .pairs import MatchResult, match_sources
    from .store import Source, open_source
    from .workflow import run

_HOMES = {
    "extract": "driver",
    "import_features": "embeddings",
    "ImgsimError": "errors",
    "match_features": "match",
    "ClusterOptions": "options",
    "CsvOptions": "options",
    "ExtractOptions": "options",
    "FetchOptions": "options",
    "MatchOptions": "options",
    "MatchResult": "pairs",
    "match_sources": "pairs",
    "Source": "store",
    "open_source": "store",
    "run": "workflow",
}
__all__ = [
    "ClusterOptions",
    "CsvOptions",
    "ExtractOptions",
    "FetchOptions",
    "ImgsimError",
    "MatchOptions",
    "MatchResult",
    "Source",
    "extract",
    "import_features",
    "match_features",
    "match_sources",
    "open_source",
    "run",
]  # = _HOMES' names (tests/test_contracts.py)
__version__ = VERSION


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value
