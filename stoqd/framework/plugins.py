"""stoQ v2's plugin base classes: the public face that users' plugins are written against.

Every plugin is built as ``Class(config, plugin_opts)``: ``config`` is its ``.stoq`` file
(``[Core]``, ``[Documentation]``, ``[options]``) and ``plugin_opts`` the options layered
over it. stoQ v2 plugins read ``plugin_opts`` first and fall back to ``config``; the loader
also folds the ``.stoq [options]`` into ``plugin_opts`` as the lowest layer, so both
styles see the same precedence: command line > stoq.cfg section > ``.stoq [options]``.
"""

from __future__ import annotations

import logging
from configparser import ConfigParser
from typing import Any, Callable, Dict, Optional, TypeVar

from .data import (
    ArchiverResponse,
    DecoratorResponse,
    DispatcherResponse,
    Payload,
    RequestMeta,
    StoqResponse,
    WorkerResponse,
)
from .exceptions import StoqPluginException
from .helpers import parse_bool, parse_list

T = TypeVar("T")
_MISSING: Any = object()


class BasePlugin:
    """What every plugin has: its name, its ``.stoq`` config, its options and a logger."""

    def __init__(self, config: ConfigParser, plugin_opts: Optional[Dict[str, Any]] = None) -> None:
        self.config = config
        self.plugin_opts: Dict[str, Any] = dict(plugin_opts or {})
        self.plugin_name = config.get("Core", "Name", fallback=type(self).__name__)
        self.__author__ = config.get("Documentation", "Author", fallback="")
        self.__version__ = config.get("Documentation", "Version", fallback="")
        self.__website__ = config.get("Documentation", "Website", fallback="")
        self.__description__ = config.get("Documentation", "Description", fallback="")
        self.log = logging.getLogger(f"stoq.{self.plugin_name}")

    def option(self, name: str, default: Any = _MISSING, kind: Callable[[Any], T] = str) -> T:  # type: ignore[assignment]
        """Read option ``name`` with stoQ's precedence, converted by ``kind``.

        ``kind`` may be ``str``, ``int``, ``float``, ``bool`` or ``list``; a value that does
        not convert raises ``StoqPluginException`` naming the plugin and the option, which
        the daemon reports as a plugin that rejects its options.
        """
        # Remembered so the daemon can tell a misspelt key in stoq.cfg from a real option.
        self.__dict__.setdefault("options_read", set()).add(name)
        if name in self.plugin_opts:
            raw = self.plugin_opts[name]
        elif self.config.has_option("options", name):
            raw = self.config.get("options", name)
        elif default is not _MISSING:
            return default  # type: ignore[no-any-return]
        else:
            raise StoqPluginException(f"plugin {self.plugin_name}: option {name} is required")
        converter: Callable[[Any], Any] = {bool: parse_bool, list: parse_list}.get(kind, kind)  # type: ignore[call-overload]
        try:
            return converter(raw)  # type: ignore[no-any-return]
        except (TypeError, ValueError) as exc:
            raise StoqPluginException(
                f"plugin {self.plugin_name}: option {name}={raw!r} is not a valid "
                f"{getattr(kind, '__name__', kind)}: {exc}"
            ) from None


class ProviderPlugin(BasePlugin):
    """Feeds payloads: ``ingest`` puts ``Payload`` objects or archiver references on ``queue``.

    Returning from ``ingest`` means the source is exhausted (stoqd never restarts it);
    raising means it crashed (stoqd restarts it with backoff). The queue stoqd passes also
    accepts ``put(item, done=callback)``: see docs/providers.md.
    """

    def ingest(self, queue: Any) -> None:
        raise NotImplementedError


class WorkerPlugin(BasePlugin):
    """Scans one payload and returns results and extracted payloads."""

    def __init__(self, config: ConfigParser, plugin_opts: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(config, plugin_opts)
        self.required_workers = set(parse_list(self.plugin_opts.get("required_workers", "")))

    def scan(self, payload: Payload, request_meta: RequestMeta) -> Optional[WorkerResponse]:
        raise NotImplementedError


class ArchiverPlugin(BasePlugin):
    """Stores payloads (destination) or fetches them back from a reference (source)."""

    def archive(self, payload: Payload, request_meta: RequestMeta) -> Optional[ArchiverResponse]:
        raise NotImplementedError

    def get(self, task: ArchiverResponse) -> Optional[Payload]:
        raise NotImplementedError


class ConnectorPlugin(BasePlugin):
    """Saves a finished ``StoqResponse`` somewhere."""

    def save(self, response: StoqResponse) -> None:
        raise NotImplementedError


class DispatcherPlugin(BasePlugin):
    """Decides which workers a payload goes to."""

    def get_dispatches(
        self, payload: Payload, request_meta: RequestMeta
    ) -> Optional[DispatcherResponse]:
        raise NotImplementedError


class DecoratorPlugin(BasePlugin):
    """Adds conclusions drawn from the whole response."""

    def decorate(self, response: StoqResponse) -> Optional[DecoratorResponse]:
        raise NotImplementedError


PLUGIN_CLASSES: Dict[str, type] = {
    "provider": ProviderPlugin,
    "worker": WorkerPlugin,
    "archiver": ArchiverPlugin,
    "connector": ConnectorPlugin,
    "dispatcher": DispatcherPlugin,
    "decorator": DecoratorPlugin,
}
