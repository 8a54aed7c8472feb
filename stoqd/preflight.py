"""Checks of the plugins a configuration names, before the daemon starts any child.

Every plugin is built once in the supervisor, so one that cannot load, rejects its
options, or is given a misspelt option stops stoqd with one line per problem (exit 78)
instead of failing in every worker. Providers check their own option names in their
child (a misspelling makes them FATAL at once), and ``stoqd --check-config`` checks them
here as well.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any, List, Tuple

from .framework.core import SCAN_PLUGIN_KEYS
from .framework.exceptions import StoqPluginException
from .framework.plugins import WorkerPlugin

if TYPE_CHECKING:
    from .framework.core import Stoq


def preflight(stoq: Stoq, providers: bool) -> Tuple[List[str], List[str]]:
    """Build the scan plugins (and with ``providers``, the providers) once here: one
    that cannot load, rejects its options or has a misspelt option stops stoqd (exit 78)
    before any child starts, rather than failing in every worker.

    The daemon leaves providers out: one that cannot start is FATAL at once in its own
    child while the others run. ``--check-config`` includes them.

    Returns (problems, warnings), one line each, naming the file and the plugin's section;
    a configuration without any provider is one of the problems.
    """
    where = stoq.config.display_path
    problems: List[str] = []
    warnings: List[str] = []
    if not stoq.core("providers"):  # a daemon with nothing to feed it would exit at once
        problems.append(f"{where}: [core] providers: no provider configured")
    lists = _PLUGIN_LISTS if providers else _PLUGIN_LISTS[1:]
    names = [name for key in lists for name in stoq.core(key)]
    for name in dict.fromkeys(names):
        try:
            plugin = stoq.load_plugin(name)
        except StoqPluginException as exc:
            message = str(exc)
            if name in stoq.config.plugin_opts:  # "[hash] option x ..." for "plugin hash: ..."
                message = f"[{name}] {message.removeprefix(f'plugin {name}: ')}"
            problems.append(f"{where}: {message}")
            continue
        errors, unread = check_option_names(stoq, name, plugin)
        problems += errors
        warnings += unread
    return problems, warnings


_PLUGIN_LISTS = ("providers", *SCAN_PLUGIN_KEYS)


def check_option_names(stoq: Stoq, name: str, plugin: Any) -> Tuple[List[str], List[str]]:
    """Keys of ``[NAME]`` the plugin neither declares (``.stoq [options]``) nor read, as
    (problems, warnings), one line each.

    An unknown key is an error when it looks like a misspelling of a known one and the
    plugin reads its options through ``option()``; a stoQ v2 plugin may read
    ``plugin_opts`` directly at any time, so for it the same key is only a warning.
    """
    problems: List[str] = []
    warnings: List[str] = []
    read = set(getattr(plugin, "options_read", ()))
    known = set(stoq.registry.spec(name).default_options()) | read
    if isinstance(plugin, WorkerPlugin):
        known.add("required_workers")
    where = stoq.config.display_path
    for key in stoq.config.plugin_opts.get(name, {}):
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        # Only a plugin reading its options through option() is known to read no other
        # key; a stoQ v2 plugin may read plugin_opts directly, so there it is a warning.
        if close and read:
            problems.append(
                f"{where}: [{name}] {key}: not an option of plugin {name} "
                f"(did you mean {close[0]}?)"
            )
        else:
            listing = ", ".join(sorted(known)) or "none"
            hint = f"; did you mean {close[0]}?" if close else ""
            warnings.append(
                f"{where}: [{name}] {key}: plugin {name} did not read this option "
                f"(its options: {listing}{hint})"
            )
    return problems, warnings
