"""imgsim-dask: find similar and near-duplicate images across huge collections, on Dask."""

from .cluster import ClusterOptions
from .driver import ExtractOptions, extract
from .errors import ImgsimError
from .fetch import FetchOptions
from .match import MatchOptions, match_features
from .pairs import MatchResult, match_sources
from .store import FeatureStore, open_store
from .workflow import run

__all__ = [
    "ClusterOptions", "ExtractOptions", "FeatureStore", "FetchOptions", "ImgsimError",
    "MatchOptions", "MatchResult", "extract", "match_features", "match_sources", "open_store", "run",
]
__version__ = "0.1.0"
