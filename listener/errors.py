"""The one exception hierarchy of merkle-listener.

Subclasses are split by what the caller does next: fix the configuration, fix the source
table, retry against the database, or distrust a proof. Every message says what to do.
"""


class MerkleListenerError(Exception):
    """Root of every error merkle-listener raises on purpose."""


class ConfigurationError(MerkleListenerError):
    """Bad settings or command-line input; nothing was written."""


class SourceTableError(MerkleListenerError):
    """A source table cannot be registered or captured as asked; nothing was written."""


class DatabaseError(MerkleListenerError):
    """The database is unreachable or refused an operation; retrying may help."""


class ProcessingError(MerkleListenerError):
    """The listener found the log in a state it must not extend (for example a fencing failure)."""


class ProofVerificationError(MerkleListenerError):
    """A proof, root or checkpoint did not verify: do not trust the log's claim."""


class CaptureGapWarning(UserWarning):
    """Done as asked, but committed changes are missing from a log; the message says which and
    how to log the rows as they are now."""


def why_no_directory(exc: OSError) -> str:
    """Why mkdir(parents=True, exist_ok=True) failed, in the words of a message: a file where
    the directory (or one above it) should be, else the system's reason."""
    return "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror
