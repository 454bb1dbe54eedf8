"""imgsim-dask: find similar and near-duplicate images across huge collections, on Dask."""

from .driver import ExtractOptions, extract
from .errors import ImgsimError
from .fetch import FetchOptions
from .store import FeatureStore, open_store

__all__ = ["ExtractOptions", "FeatureStore", "FetchOptions", "ImgsimError", "extract", "open_store"]
__version__ = "0.1.0"
