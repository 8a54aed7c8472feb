"""``Stoq``: stoQ v2's entry point, on stoqd's configuration, plugin loader and scan."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .. import config as configuration
from .data import ArchiverResponse, Payload, PayloadMeta, RequestMeta, StoqResponse
from .exceptions import StoqException, StoqPluginException
from .loader import PluginRegistry
from .plugins import ArchiverPlugin, BasePlugin
from .scan import PluginSource, Scan, ScanPolicy, save

log = logging.getLogger("stoqd")

# The [core] lists naming the plugins a scan uses (providers feed scans; they are not here).
SCAN_PLUGIN_KEYS = (
    "source_archivers",
    "dest_archivers",
    "connectors",
    "dispatchers",
    "decorators",
    "always_dispatch",
)

# The [core] keys a Stoq(...) argument overrides; an explicit argument (from the
# command line) always wins over the file: stoQ v2 let the file's max_recursion win,
# which surprised users, and stoqd does not keep that quirk.
_CORE_ARGS = (
    "providers",
    *SCAN_PLUGIN_KEYS,
    "max_queue",
    "max_recursion",
    "max_dispatch_passes",
    "max_payload_size",
    "log_level",
)


class Stoq(PluginSource):
    """Load plugins, scan payloads, run providers, as stoQ v2's ``Stoq`` did."""

    def __init__(
        self,
        base_dir: Optional[str] = None,
        config_file: Optional[str] = None,
        log_dir: Optional[str] = None,
        log_level: Optional[str] = None,
        plugin_dir_list: Optional[List[str]] = None,
        plugin_opts: Optional[Dict[str, Dict[str, Any]]] = None,
        providers: Optional[List[str]] = None,
        provider_consumers: Optional[int] = None,
        source_archivers: Optional[List[str]] = None,
        dest_archivers: Optional[List[str]] = None,
        connectors: Optional[List[str]] = None,
        dispatchers: Optional[List[str]] = None,
        decorators: Optional[List[str]] = None,
        always_dispatch: Optional[List[str]] = None,
        max_queue: Optional[int] = None,
        max_recursion: Optional[int] = None,
        max_dispatch_passes: Optional[int] = None,
        max_payload_size: Optional[int] = None,
        config: Optional[configuration.Config] = None,
    ) -> None:
        if config is None:
            if config_file is None and base_dir is not None:
                candidate = Path(base_dir) / "stoq.cfg"
                config_file = str(candidate) if candidate.is_file() else None
            config = configuration.load(config_file)
        self.config = config
        explicit = dict(locals())
        for key in _CORE_ARGS:
            if explicit[key] is not None:
                self.config.values["core"][key] = explicit[key]
        if provider_consumers is not None:
            self.config.values["stoqd"]["workers"] = provider_consumers
        dirs = [config.resolve_path(d) for d in config.get("core", "plugin_dir_list")]
        dirs += [Path(d) for d in plugin_dir_list or []]
        self.registry = PluginRegistry(dirs)
        self.plugin_opts: Dict[str, Dict[str, Any]] = {
            name: dict(opts) for name, opts in config.plugin_opts.items()
        }
        for name, opts in (plugin_opts or {}).items():
            self.plugin_opts.setdefault(name, {}).update(opts)
        self._loaded: Dict[str, BasePlugin] = {}
        self._extra_dirs = [str(d) for d in plugin_dir_list or []]
        self.last_timings: Dict[str, float] = {}

    def spec(self) -> Dict[str, Any]:
        """What a child process needs to build the same ``Stoq`` (see ``from_spec``)."""
        return {
            "config": self.config,
            "plugin_dir_list": self._extra_dirs,
            "plugin_opts": self.plugin_opts,
        }

    @classmethod
    def from_spec(cls, spec: Dict[str, Any]) -> Stoq:
        return cls(
            config=spec["config"],
            plugin_dir_list=spec["plugin_dir_list"],
            plugin_opts=spec["plugin_opts"],
        )

    # -- plugins --------------------------------------------------------------------

    def core(self, key: str) -> Any:
        return self.config.get("core", key)

    def check(self) -> None:
        """Validate the whole configuration against the known plugins (ConfigError)."""
        configuration.check_plugins(self.config, self.registry.names())

    def load_plugin(self, name: str) -> BasePlugin:
        """Build plugin ``name`` with its layered options (cached per process)."""
        if name not in self._loaded:
            self._loaded[name] = self.registry.load(name, self.plugin_opts.get(name))
        return self._loaded[name]

    get = load_plugin

    def list_plugins(self) -> Dict[str, Dict[str, str]]:
        listing = {}
        for name in self.registry.names():
            spec = self.registry.spec(name)
            try:
                kind = self.registry.kind(name)
            except StoqPluginException as exc:
                kind = f"unloadable: {exc}"
            listing[name] = {"kind": kind, "description": spec.description, "origin": spec.origin}
        return listing

    def load_scan_plugins(self) -> None:
        """Build every plugin a scan may need now, so a broken one fails before work."""
        for key in SCAN_PLUGIN_KEYS:
            for name in self.core(key):
                self.load_plugin(name)

    # -- scanning -------------------------------------------------------------------

    def policy(self) -> ScanPolicy:
        core = self.config.values["core"]
        return ScanPolicy(
            always_dispatch=list(core["always_dispatch"]),
            max_recursion=core["max_recursion"],
            max_dispatch_passes=core["max_dispatch_passes"],
            max_payload_size=core["max_payload_size"],
        )

    def scan_unsaved(
        self,
        payload: Payload,
        request_meta: Optional[RequestMeta] = None,
        add_start_dispatch: Optional[List[str]] = None,
    ) -> StoqResponse:
        """Scan, archive and decorate ``payload``; connectors are not called."""
        # Read per scan, not cached: a library user may change ``config`` between scans.
        # One lookup of the section, as this runs for every item a worker scans.
        core = self.config.values["core"]
        scan = Scan(
            self,
            self.policy(),
            dispatchers=list(core["dispatchers"]),
            dest_archivers=list(core["dest_archivers"]),
            decorators=list(core["decorators"]),
            request_meta=request_meta or RequestMeta(),
        )
        response = scan.run(payload, list(add_start_dispatch or []))
        self.last_timings = scan.timings
        return response

    def save(self, response: StoqResponse) -> List[str]:
        """Save through every connector; returns one line per failure (also logged)."""
        failures = save(self, list(self.core("connectors")), response)
        for failure in failures:
            log.error(failure)
        return failures

    def scan_payload(
        self,
        payload: Payload,
        request_meta: Optional[RequestMeta] = None,
        add_start_dispatch: Optional[List[str]] = None,
    ) -> StoqResponse:
        response = self.scan_unsaved(payload, request_meta, add_start_dispatch)
        for failure in self.save(response):
            response.errors["stoq"].append(failure)
        return response

    def scan(
        self,
        content: bytes,
        payload_meta: Optional[PayloadMeta] = None,
        request_meta: Optional[RequestMeta] = None,
        add_start_dispatch: Optional[List[str]] = None,
        ratelimit: Optional[str] = None,
    ) -> StoqResponse:
        """Scan bytes and save the result, as stoQ v2's ``Stoq.scan``."""
        payload = Payload(content, payload_meta)
        return self.scan_payload(payload, request_meta, add_start_dispatch)

    def resolve(self, reference: Union[str, Dict[str, Any]]) -> Payload:
        """Turn a provider's reference into a payload through the source archivers.

        A dict (or a JSON text of one) ``{"ARCHIVER": {task}}`` goes to that archiver,
        as in stoQ's two-tier pipelines; any other text goes to each configured source
        archiver in turn as ``{"path": text}`` until one returns a payload. A reference
        comes from a message, so it may only name a configured source archiver: never
        some other installed plugin.
        """
        allowed = self.core("source_archivers")
        task = _as_archiver_task(reference)
        if task is not None:
            attempts = list(task.items())
            for name, _ in attempts:
                if name not in allowed:
                    raise StoqException(
                        f"reference names archiver {name!r}, which is not in [core] "
                        f"source_archivers ({', '.join(allowed) or 'none configured'})"
                    )
        else:
            attempts = [(name, {"path": reference}) for name in allowed]
        if not attempts:
            raise StoqException(
                f"reference {str(reference)[:200]!r} needs a source archiver; "
                "none is configured ([core] source_archivers)"
            )
        errors = []
        for name, meta in attempts:
            archiver = self.load_plugin(name)
            if not isinstance(archiver, ArchiverPlugin):
                raise StoqPluginException(f"plugin {name} is not an ArchiverPlugin")
            payload = archiver.get(ArchiverResponse(meta))
            if isinstance(payload, Payload):
                payload.payload_meta.extra_data.setdefault("archiver", {name: meta})
                return payload
            errors.append(f"{name} returned {type(payload).__name__}")
        raise StoqException(f"no source archiver resolved the reference: {'; '.join(errors)}")

    def run(
        self,
        request_meta: Optional[RequestMeta] = None,
        add_start_dispatch: Optional[List[str]] = None,
    ) -> int:
        """Run the configured providers under the daemon until every one is exhausted."""
        from ..daemon import run_daemon

        return run_daemon(self, request_meta=request_meta, add_start_dispatch=add_start_dispatch)


def _as_archiver_task(reference: Union[str, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if isinstance(reference, dict):
        return reference
    text = reference.strip()
    if not text.startswith("{"):
        return None
    try:
        decoded = json.loads(text)
    except ValueError as exc:
        raise StoqException(f"reference is not valid JSON: {exc}") from None
    if not isinstance(decoded, dict) or not all(isinstance(v, dict) for v in decoded.values()):
        raise StoqException('reference must be {"ARCHIVER": {...}}')
    return decoded
