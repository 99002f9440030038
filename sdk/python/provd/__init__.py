"""Write provd provisioning plugins in Python.

A plugin is a class with a ``provision`` method that takes a
:class:`Request` and returns a :class:`Report`, or raises a
:class:`ProvdError`. It reaches the node only through the modules here
(``log``, ``progress``, ``hashing``, ``images``, ``dedup``,
``partitions``, ``vm``), each a capability its ``plugin.toml`` must
declare; the node refuses a plugin that imports one it does not grant.

``app.py``::

    import provd
    from provd import log, hashing

    class Hello(provd.Plugin):
        def provision(self, request: provd.Request) -> provd.Report:
            name = request.params().get("name", "world")
            log.info("hello", name=name)
            return provd.Report(f"hello, {name}", fields={"digest": hashing.blake3(name.encode())})

    WitWorld = provd.export(Hello)

``provctl plugin build`` (a ``plugin.toml`` beside ``app.py``) makes the
component with componentize-py, targeting a world with exactly the
capabilities ``plugin.toml`` declares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Type

from . import errors
from .errors import Denied, Failed, InvalidInput, NotFound, ProvdError, QuotaExceeded

__all__ = [
    "Plugin",
    "Request",
    "Report",
    "export",
    "ProvdError",
    "InvalidInput",
    "Denied",
    "NotFound",
    "QuotaExceeded",
    "Failed",
]


@dataclass(frozen=True)
class Request:
    """A provisioning request as the manager sent it."""

    operation_id: str
    #: The plugin's parameters, a JSON document.
    input: str

    def params(self) -> Dict[str, Any]:
        """The parameters as a dict; malformed JSON is ``InvalidInput``."""
        if not self.input.strip():
            return {}
        try:
            value = json.loads(self.input)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"input: not JSON: {e}") from None
        if not isinstance(value, dict):
            raise InvalidInput("input: a JSON object is needed")
        return value


@dataclass
class Report:
    """What the plugin did: one line, key figures, and JSON detail."""

    summary: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    #: Any JSON-serialisable value.
    output: Any = None

    def _to_wit(self):
        import wit_world

        types = errors.capability("types")
        return wit_world.Report(
            summary=self.summary,
            fields=[types.Field(key=str(k), value=str(v)) for k, v in self.fields.items()],
            output="" if self.output is None else json.dumps(self.output),
        )


class Plugin:
    """Base class of a plugin: override :meth:`provision`."""

    def provision(self, request: Request) -> Report:
        raise NotImplementedError("a plugin overrides provision(request)")


def export(plugin: Type[Plugin]) -> type:
    """The class componentize-py exports (bind it to ``WitWorld`` in
    ``app.py``): it turns the WIT request into a :class:`Request`, calls
    ``plugin().provision``, and turns a :class:`ProvdError` into the WIT
    error the node records. Any other exception fails the request with its
    type and message.

    It runs while the component is built, and imports every module the
    plugin can use then: a plugin has no filesystem, so a module first
    imported while a request runs is not found (import what you need at the
    top of ``app.py``)."""
    import wit_world
    from componentize_py_types import Err

    errors.preload()

    class WitWorld(wit_world.WitWorld):
        def provision(self, request):
            try:
                report = plugin().provision(Request(request.operation_id, request.input))
                if not isinstance(report, Report):
                    raise Failed(f"provision returned {type(report).__name__}, not a Report")
                return report._to_wit()
            except ProvdError as e:
                raise Err(e._to_wit())
            except Err:
                raise
            except Exception as e:  # the plugin's own bug: a failed request, named
                raise Err(Failed(f"{type(e).__name__}: {e}")._to_wit())

    WitWorld.__name__ = "WitWorld"
    return WitWorld
