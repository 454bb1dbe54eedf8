"""About: the package's name and version, read once from its installed metadata."""

from importlib.metadata import version

PACKAGE = "imgsim-dask"
VERSION = version(PACKAGE)
