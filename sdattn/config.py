"""Objects from config nodes: Hydra's ``instantiate`` with the project's one-line user errors kept."""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate

from .errors import UserError


def instantiate(node, *args, **kwargs):
    """``hydra.utils.instantiate`` that lets our one-line user errors through unwrapped."""
    try:
        return hydra_instantiate(node, *args, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        raise
