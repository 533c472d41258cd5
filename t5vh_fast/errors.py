"""The package's own exceptions.

Every error raised for something the *user* can fix (a wrong path, a bad
option, a file that is not what it should be) is a ``T5vhError``; the command
line turns exactly these into one line and exit status 1, while anything else
keeps its traceback (that is a bug to report). Each class also derives from the
built-in exception a caller would expect (``ValueError``, ``FileNotFoundError``,
...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class T5vhError(Exception):
    """Base class: a problem with the user's input, files or environment, with its fix in the message."""


class InputError(T5vhError, ValueError):
    """A bad argument or bad input data (option out of range, token id outside the vocabulary, ...)."""


class ModelError(T5vhError, ValueError):
    """A model directory that cannot be loaded as a T5 value-head model (not T5, bad weights, ...)."""


class ExportError(T5vhError, ValueError):
    """An export directory the runtime cannot trust (missing, another format version, tampered)."""


class ParityError(T5vhError, RuntimeError):
    """Exported graphs that do not match the PyTorch model within the parity tolerance."""


class PathNotFound(T5vhError, FileNotFoundError):
    """A path the user named does not exist (or is the wrong kind of thing)."""


class PathExists(T5vhError, FileExistsError):
    """An output path that already exists and may not be replaced."""


class OutputError(T5vhError, OSError):
    """An output that cannot be written (read-only, full disk, the input itself, another job's)."""


class ProviderError(T5vhError, RuntimeError):
    """An onnxruntime execution provider that is missing or did not start."""


class NonFiniteError(T5vhError, FloatingPointError):
    """NaN or inf in weights, logits or values: refusing to produce garbage numbers.

    ``row``: the batch row whose numbers are not finite, when one is to blame."""

    def __init__(self, message: str, *, row=None):
        super().__init__(message)
        self.row = row


class DependencyError(T5vhError, ImportError):
    """An optional dependency (an extra such as ``t5vh_fast[ray]``) that is not installed."""


class ClusterError(T5vhError, ConnectionError):
    """A Ray cluster that cannot be reached or joined."""
