"""Errors meant for the user: the CLI prints them as one line and exits non-zero."""


class UserError(ValueError):
    """Bad input (config value, prompt, path, ...). The message names the value and what is allowed."""


class ModelLoadError(UserError):
    """A model id or path that cannot be loaded here."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of ``error``'s message, or its type name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
