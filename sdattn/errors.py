"""Errors meant for the user: the CLI prints them as one line and exits non-zero."""


class UserError(ValueError):
    """Bad input (config value, prompt, path, ...). The message names the value and what is allowed."""


class ModelLoadError(UserError):
    """A model id or path that cannot be loaded here."""
