"""imgsim-dask: find similar and near-duplicate images across huge collections, on Dask."""

from .about import VERSION
from .driver import extract
from .embeddings import import_features
from .errors import ImgsimError
from .match import match_features
from .options import ClusterOptions, CsvOptions, ExtractOptions, FetchOptions, MatchOptions
from .pairs import MatchResult, match_sources
from .store import Source, open_source
from .workflow import run

__all__ = [
    "import_features",
    "ClusterOptions",
    "CsvOptions",
    "ExtractOptions",
    "FetchOptions",
    "ImgsimError",
    "MatchOptions",
    "MatchResult",
    "Source",
    "extract",
    "match_features",
    "match_sources",
    "open_source",
    "run",
]
__version__ = VERSION
