"""A provider's child process: load the plugin, run ``ingest(queue)``, relay completions.

Exit codes tell the supervisor what happened: 0 the source is exhausted (``ingest``
returned and every item it put has been reported back), ``EXIT_BOOT`` the plugin could
not be loaded, anything else a crash.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import Any, Dict

from . import childproc, logs
from .framework.core import Stoq
from .framework.exceptions import StoqPluginException
from .framework.plugins import ProviderPlugin
from .preflight import check_option_names
from .wire import Endpoint
from .workqueue import ProviderQueue


def _read_supervisor(endpoint: Endpoint, queue: ProviderQueue) -> None:
    log = logs.get()
    while True:
        message = endpoint.receive()
        if message is None:  # the supervisor is gone: nobody can scan what we put
            os._exit(1)
        if message[0].get("t") == "terminate":
            # Every outcome sent before it has gone to its callback: now stop. Sent to the
            # main thread itself, so a blocking call there is interrupted.
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)
            continue
        try:
            queue.on_message(message[0])  # a failing done callback is logged there
        except Exception as exc:  # this reader must outlive anything: it ends the run
            log.error("supervisor_message_failed", error=childproc.one_line(exc))


def _check_options(stoq: Stoq, name: str, plugin: ProviderPlugin) -> None:
    """A misspelt option in the provider's section is a boot failure (FATAL at once)."""
    problems, warnings = check_option_names(stoq, name, plugin)
    for line in warnings:
        logs.get().warning("config_unread_option", detail=line)
    if problems:
        raise StoqPluginException(problems[0])


def provider_main(
    name: str, sock: socket.socket, spec: Dict[str, Any], settings: Dict[str, Any]
) -> None:
    childproc.prepare(f"provider:{name}", settings)
    log = logs.get()
    endpoint = Endpoint(sock)
    try:
        stoq = Stoq.from_spec(spec)
        plugin = stoq.load_plugin(name)
        if not isinstance(plugin, ProviderPlugin):
            raise TypeError(f"plugin {name} is not a ProviderPlugin")
        _check_options(stoq, name, plugin)
    except Exception as exc:  # whatever a plugin's import or __init__ raises
        error = childproc.one_line(exc)
        log.error("boot_failed", provider=name, error=error)
        endpoint.send({"t": "boot_failed", "error": error})
        sys.exit(childproc.EXIT_BOOT)
    queue = ProviderQueue(endpoint, settings["inline_max_bytes"], settings["spool_dir"])
    threading.Thread(
        target=_read_supervisor, args=(endpoint, queue), name="stoqd-completions", daemon=True
    ).start()
    endpoint.send({"t": "ready"})
    try:
        plugin.ingest(queue)
    except SystemExit:
        raise
    except BaseException as exc:
        error = childproc.one_line(exc)
        log.error("ingest_failed", provider=name, error=error, exc_info=True)
        endpoint.send({"t": "crashed", "error": error})
        sys.exit(1)
    if not queue.stopping.is_set():
        endpoint.send({"t": "exhausted", "put": queue.put_count})
    # Completion callbacks (acks, file moves) still have to run for what was put.
    queue.wait_idle()
