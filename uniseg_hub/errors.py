"""One exception hierarchy for everything uniseg-hub raises on purpose.

Every message names the thing, the cause and the fix, so the command line can print it as a single line.
Subclasses also derive from the matching built-in (``ValueError``, ``KeyError``...) so generic handlers work.
"""


class UnisegHubError(Exception):
    """Base class of all uniseg-hub errors."""


class UnknownTaskError(UnisegHubError, ValueError):
    """A task name or id that is not one of the model's tasks."""


class InputShapeError(UnisegHubError, ValueError):
    """An input tensor whose channel count or spatial size the network cannot take."""


class UnsupportedChannelsError(UnisegHubError, ValueError):
    """An ``in_channels`` request that no stem can serve."""


class UnsafeCheckpointError(UnisegHubError):
    """A pickle that needs globals outside the allow-list (it could run code): refused, never executed."""


class IncompatibleCheckpointError(UnisegHubError):
    """A checkpoint whose tensors do not fit the architecture (missing, unexpected or misshaped)."""
