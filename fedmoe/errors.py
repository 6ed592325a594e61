"""The error hierarchy. Every user-facing failure is a :class:`FedMoeError` whose message names the
file, key or expert at fault and says what to do; the CLI maps the class to a documented exit code.

| class            | exit code | meaning                                                      |
| ---------------- | --------- | ------------------------------------------------------------ |
| ``UsageError``   | 2         | bad option or argument, impossible request, bad recipe key   |
| ``InputError``   | 3         | invalid input data: file, manifest, checkpoint, checksum     |
| ``OutputError``  | 4         | output refused: exists without ``--force``, not writable     |
"""

from __future__ import annotations


class FedMoeError(Exception):
    """Base class of every error that is the user's to fix.

    Parameters
    ----------
    message
        One line naming the file, key or expert and what is wrong with it.
    hint
        Optional second line: what to do about it.
    """

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        """Pickle by state, whatever the subclass's constructor takes: an error raised in a worker
        process reaches the parent whole (class, message, hint and the subclass's fields)."""
        return (_restore, (type(self), self.message, dict(self.__dict__)))


def _restore(cls: type[FedMoeError], message: str, state: dict[str, object]) -> FedMoeError:
    """The inverse of :meth:`FedMoeError.__reduce__`."""
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class UsageError(FedMoeError):
    """A bad option, argument or recipe key, or an impossible request (exit code 2)."""

    exit_code = 2


class InputError(FedMoeError):
    """Invalid input data: malformed file, bad manifest, checksum or shape mismatch (exit 3)."""

    exit_code = 3


class OutputError(FedMoeError):
    """An output that cannot be written: exists without ``--force``, not writable (exit 4)."""

    exit_code = 4


class ParamError(UsageError):
    """A parameter with a bad value, named by its key (exit code 2).

    The core knows only the key (``alpha``, ``top_p``); whoever the user spoke to words it: the CLI
    as an option (``--top-p``), the recipe loader as a recipe key (``fedmoe.top_p``).

    Parameters
    ----------
    key
        The parameter's field name.
    value
        The value given.
    reason
        What the value must be, e.g. "must be >= 0".
    hint
        Optional remedy.
    """

    def __init__(
        self, key: str, value: object, reason: str, hint: str | None = None, show: bool = True
    ) -> None:
        self.key = key
        self.value = value
        self.reason = reason
        self.show = show  # append ", got VALUE" (off when the reason already says it)
        super().__init__(self.worded(key), hint)

    def worded(self, name: str) -> str:
        """The message with the parameter called ``name``."""
        return f"{name} {self.reason}" + (f", got {self.value!r}" if self.show else "")

    def as_option(self) -> str:
        """The message as the CLI says it (``--top-p must be >= 0, got -1``)."""
        return self.worded("--" + self.key.replace("_", "-"))


class Interrupted(FedMoeError):
    """The user interrupted a long command (Ctrl-C); the message says what was kept (exit 130)."""

    exit_code = 130
