"""The errors of the WIT contract as exceptions.

Host calls raise them for refusals a plugin can handle; a plugin raises
them from ``provision`` to fail the request with that kind.
"""

from __future__ import annotations


class ProvdError(Exception):
    """An error the node and the manager can tell apart by kind."""

    kind = "failed"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def _to_wit(self):
        types = capability("types")
        cls = {
            "invalid-input": types.Error_InvalidInput,
            "denied": types.Error_Denied,
            "not-found": types.Error_NotFound,
            "quota-exceeded": types.Error_QuotaExceeded,
        }.get(self.kind, types.Error_Failed)
        return cls(self.message)


class InvalidInput(ProvdError):
    """The input was malformed; the message names the field."""

    kind = "invalid-input"


class Denied(ProvdError):
    """The node's policy does not allow this."""

    kind = "denied"


class NotFound(ProvdError):
    """Something the call named does not exist."""

    kind = "not-found"


class QuotaExceeded(ProvdError):
    """A quota the plugin runs under would be exceeded."""

    kind = "quota-exceeded"


class Failed(ProvdError):
    """The operation failed; the message says why."""

    kind = "failed"


_BY_WIT = {
    "Error_InvalidInput": InvalidInput,
    "Error_Denied": Denied,
    "Error_NotFound": NotFound,
    "Error_QuotaExceeded": QuotaExceeded,
    "Error_Failed": Failed,
}


def from_wit(err) -> ProvdError:
    """The exception for a WIT error value (``Err(...).value``)."""
    value = getattr(err, "value", err)
    cls = _BY_WIT.get(type(value).__name__, Failed)
    return cls(getattr(value, "value", str(value)))


# The WIT modules, imported once while the component is built
# (`provd.export` runs at build time): a plugin has no filesystem, so a
# module first imported while a request runs cannot be found.
_MODULES: dict = {}
_ERR = None


def preload() -> None:
    """Imports the WIT bindings of every capability the plugin's world has."""
    global _ERR
    import importlib

    from componentize_py_types import Err

    _ERR = Err
    for name in ("types", "log", "progress", "hashing", "images", "dedup", "partitions", "vm"):
        try:
            _MODULES[name] = importlib.import_module(f"wit_world.imports.{name}")
        except ModuleNotFoundError:
            pass


def call(f, *args):
    """Calls a host function, raising its WIT error as a ProvdError."""
    try:
        return f(*args)
    except Exception as e:
        if _ERR is not None and isinstance(e, _ERR):
            raise from_wit(e) from None
        raise


def capability(name: str):
    """The WIT module of capability ``name``, or ``Denied`` if the plugin's
    world (its plugin.toml) does not import it."""
    module = _MODULES.get(name)
    if module is None:
        raise Denied(
            f"capability `{name}` is not declared in plugin.toml, so this plugin was built without it"
        )
    return module
