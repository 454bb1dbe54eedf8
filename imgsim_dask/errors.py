"""Errors that reach the user as one clear line (the CLI exits 2 on them).

A message names an option with `opt(name)`: read from Python it says the parameter
(`weights`), and the CLI shows its flag (`--weights`, `ImgsimError.render`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

_MARK = "\x1f"  # around an option's name in a message's template


def opt(name: str) -> str:
    """An option's name as it goes into an error message."""
    return f"{_MARK}{name}{_MARK}"


class ImgsimError(Exception):
    """A problem the user can fix: bad input, missing weights, a store in the way."""

    def __init__(self, template: str = ""):
        self.template = template
        super().__init__(self.render(lambda name: name))

    def render(self, name_of: Callable[[str], str]) -> str:
        """The message with each option named by `name_of(option)`."""
        return re.sub(f"{_MARK}(\\w+){_MARK}", lambda m: name_of(m.group(1)), self.template)


class InputError(ImgsimError):
    """The input CSV or an option is unusable."""


class OptionError(InputError):
    """An option's value is unusable, or two options contradict each other."""


class WeightsError(ImgsimError):
    """Model weights could not be found or loaded."""


class StoreError(ImgsimError):
    """A feature store is missing, incomplete, or already exists."""
