"""One exception hierarchy for everything uniseg-hub raises on purpose.

Every message names the thing, the cause and the fix, so the command line can print it as a single line.
Subclasses also derive from the matching built-in (``ValueError``, ``KeyError``...) so generic handlers work.
"""


class UnisegHubError(Exception):
    """Base class of all uniseg-hub errors."""


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM, raised by the command line's signal handlers where the process is, so that what a
    command was writing is cleaned up (atomic writes, the outputs' lock). A BaseException, so that nothing on the
    way catches it as an error, and not a ``KeyboardInterrupt``: CPython ends a process with SIGINT at exit once one
    passed through certain C calls, even if it was handled, which would hide the exit status."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


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


class ManifestError(UnisegHubError, ValueError):
    """A weights manifest that is not valid JSON or breaks the schema (missing field, bad sha, duplicate name)."""


class UnknownModelError(UnisegHubError, LookupError):
    """A model name that the manifest does not list (and that is not a local folder)."""


class NotPublishedError(UnisegHubError, LookupError):
    """A manifest entry with no copy on the Hub yet (the official 11-task model today)."""


class DownloadError(UnisegHubError, OSError):
    """The Hub could not serve the file: no such repository, revision or file, refused access, network failure."""


class IncompleteDownloadError(DownloadError):
    """A transfer that ended early or with the wrong size; the download is tried once more before it is reported."""


class NotAvailableOfflineError(DownloadError):
    """Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) and the file is not in the cache."""


class ChecksumError(UnisegHubError, OSError):
    """A file whose size or sha256 differs from the manifest's, even after fetching it once more."""

    def __init__(self, message: str, *, path=None, expected: str | None = None, actual: str | None = None):
        super().__init__(message)
        self.path, self.expected, self.actual = path, expected, actual


class UpstreamFileError(ChecksumError):
    """An upstream (original) checkpoint that arrived but is not the model its manifest entry describes: wrong size
    or sha256, an HTML page, a pickle the allow-listed loader refuses, or tensors that are not the architecture."""


class PublishError(UnisegHubError):
    """``publish`` could not build or upload a repository (bad folder, bad repo id, refused by the Hub)."""


class InputError(UnisegHubError, ValueError):
    """An input image that cannot be segmented as given (missing, unreadable, wrong shape or values)."""


class TrainingError(UnisegHubError, ValueError):
    """A training set-up that cannot work: bad datalist, labels, transfer mode or checkpoint folder."""


class ResumeError(TrainingError):
    """A run that cannot be resumed (or would silently overwrite an earlier one)."""


class DatasetLayoutError(UnisegHubError, ValueError):
    """A raw dataset folder that does not have the layout ``uniseg-hub prepare`` expects."""


class SampleDataError(UnisegHubError):
    """The sample scans could not be fetched from PyPI or failed their sha256 check."""


class ConfigError(UnisegHubError, ValueError):
    """A configuration (config.json, a manifest's architecture, an option) with a wrong type, range or length."""


def os_error_text(error: OSError) -> str:
    """An ``OSError`` as one message: the system's reason and the file it concerns (``No space left on device
    (out/x.nii.gz)``), for the command line's error line and a cohort's report."""
    return f"{error.strerror or error}" + (f" ({error.filename})" if error.filename else "")
