"""Errors that reach the user as one clear line (the CLI exits 2 on them)."""


class ImgsimError(Exception):
    """A problem the user can fix: bad input, missing weights, a store in the way."""


class InputError(ImgsimError):
    """The input CSV or an option is unusable."""


class WeightsError(ImgsimError):
    """Model weights could not be found or loaded."""


class StoreError(ImgsimError):
    """A feature store is missing, incomplete, or already exists."""
