"""Plugin ``yara``: a worker reporting rule matches and a dispatcher driven by rule meta.

Both rules files are compiled once, when the plugin loads, so a syntax error stops the
daemon before any work with the file and line named. A match that exceeds ``timeout``
is reported as an error in the result; the payload's other workers still run.
"""

from __future__ import annotations

import math
from configparser import ConfigParser
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yara

from stoqd.framework.data import DispatcherResponse, Payload, RequestMeta, WorkerResponse
from stoqd.framework.exceptions import StoqPluginException
from stoqd.framework.plugins import DispatcherPlugin, WorkerPlugin

from ._options import positive_float, positive_int

HERE = Path(__file__).resolve().parent
DEFAULT_WORKER_RULES = HERE / "yara_worker.yar"
DEFAULT_DISPATCH_RULES = HERE / "yara_dispatch.yar"

Match = Dict[str, Any]


class YaraPlugin(WorkerPlugin, DispatcherPlugin):
    """Worker results: ``{"matches": [{"rule", "namespace", "tags", "meta", "strings"}]}``.

    As a dispatcher, every matching dispatch rule with a ``plugin`` meta (one name or a
    comma-separated list) sends the payload to those workers.
    """

    def __init__(self, config: ConfigParser, plugin_opts: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(config, plugin_opts)
        timeout = self.option("timeout", 60.0, positive_float)
        # yara counts whole seconds; rounding up never cuts a match shorter than asked.
        self.timeout = max(1, math.ceil(timeout))
        self.max_strings = self.option("max_strings", 50, positive_int)
        self.max_string_bytes = self.option("max_string_bytes", 64, positive_int)
        self.worker_rules = self._compile("worker_rules", DEFAULT_WORKER_RULES)
        self.dispatch_rules = self._compile("dispatch_rules", DEFAULT_DISPATCH_RULES)

    def _compile(self, option: str, default: Path) -> Any:
        value = self.option(option, "", str).strip()
        path = Path(value).expanduser() if value else default
        if not path.is_file():
            raise StoqPluginException(
                f"plugin {self.plugin_name}: option {option}: rules file {path} does not exist"
            )
        try:
            return yara.compile(filepath=str(path))
        except yara.SyntaxError as exc:
            # yara's message already reads "FILE(LINE): what is wrong".
            raise StoqPluginException(
                f"plugin {self.plugin_name}: option {option}: {exc}"
            ) from None
        except yara.Error as exc:
            raise StoqPluginException(
                f"plugin {self.plugin_name}: option {option}: cannot compile {path}: {exc}"
            ) from None

    # -- worker ---------------------------------------------------------------------

    def scan(self, payload: Payload, request_meta: RequestMeta) -> Optional[WorkerResponse]:
        matches, errors = self._match(self.worker_rules, "worker_rules", payload.content)
        if matches is None:
            return WorkerResponse(errors=errors)
        return WorkerResponse(results={"matches": matches}, errors=errors)

    # -- dispatcher -----------------------------------------------------------------

    def get_dispatches(
        self, payload: Payload, request_meta: RequestMeta
    ) -> Optional[DispatcherResponse]:
        matches, errors = self._match(self.dispatch_rules, "dispatch_rules", payload.content)
        response = DispatcherResponse(errors=errors)
        for match in matches or []:
            for name in str(match["meta"].get("plugin", "")).split(","):
                name = name.strip().lower()
                if name and name not in response.plugin_names:
                    response.plugin_names.append(name)
                    response.meta[name] = match
        return response

    # -- matching -------------------------------------------------------------------

    def _match(
        self, rules: Any, which: str, content: bytes
    ) -> Tuple[Optional[List[Match]], List[str]]:
        """Matches as JSON-ready dicts (None when the scan failed) and error lines."""
        errors: List[str] = []

        def on_warning(kind: int, message: Any) -> int:
            # "too many matches" and the like: the scan goes on, the user is told.
            errors.append(f"{which}: yara warning: {message}")
            return int(yara.CALLBACK_CONTINUE)

        try:
            found = rules.match(data=content, timeout=self.timeout, warnings_callback=on_warning)
        except yara.TimeoutError:
            errors.append(f"{which}: scan timed out after {self.timeout} s; no matches reported")
            return None, errors
        except yara.Error as exc:
            errors.append(f"{which}: scan failed: {exc}")
            return None, errors
        return [self._render(match) for match in found], errors

    def _render(self, match: Any) -> Match:
        strings: List[Dict[str, Any]] = []
        for string in match.strings:
            for instance in string.instances:
                if len(strings) >= self.max_strings:
                    break
                strings.append(
                    {
                        "identifier": string.identifier,
                        "offset": instance.offset,
                        "length": instance.matched_length,
                        "data": printable(instance.matched_data[: self.max_string_bytes]),
                    }
                )
        return {
            "rule": match.rule,
            "namespace": match.namespace,
            "tags": list(match.tags),
            "meta": dict(match.meta),
            "strings": strings,
        }


def printable(data: bytes) -> str:
    """Bytes as text safe for logs and terminals: printable ASCII kept, the rest as \\xNN."""
    return "".join(
        chr(byte) if 0x20 <= byte < 0x7F and byte != 0x5C else f"\\x{byte:02x}" for byte in data
    )
