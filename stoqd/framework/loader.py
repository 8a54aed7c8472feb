"""Finding and building plugins: ``.stoq`` files in plugin directories, and entry points.

A plugin directory holds, anywhere below it, ``NAME.stoq`` files (``[Core] Name``,
``Module``; ``[Documentation]``; ``[options]``) with the module beside them, exactly as
stoQ v2 laid them out. Installed packages register plugins under the entry-point group
``stoqd.plugins`` (``name = "package.module:Class"``), with an optional ``NAME.stoq``
beside the module for defaults. A name found in a plugin directory wins over an entry
point, so a user can replace a built-in.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from configparser import ConfigParser
from configparser import Error as ConfigParserError
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Iterable, List, Optional

from .exceptions import StoqPluginException, StoqPluginNotFound
from .plugins import PLUGIN_CLASSES, BasePlugin

ENTRY_POINT_GROUP = "stoqd.plugins"


@dataclass
class PluginSpec:
    """Where a plugin comes from, known without importing it."""

    name: str
    config: ConfigParser
    origin: str  # the .stoq file, or "entry point pkg.mod:Class"
    module_file: Optional[Path] = None  # plugin-directory plugins
    entry_point: Optional[str] = None  # installed plugins

    @property
    def description(self) -> str:
        return self.config.get("Documentation", "Description", fallback="")

    def default_options(self) -> Dict[str, str]:
        if not self.config.has_section("options"):
            return {}
        return dict(self.config.items("options"))


def _read_stoq_file(path: Path) -> ConfigParser:
    config = ConfigParser()
    try:
        with open(path, encoding="utf-8") as handle:
            config.read_file(handle)
    except (OSError, UnicodeDecodeError, ConfigParserError) as exc:
        message = str(exc).splitlines()[0]
        raise StoqPluginException(f"{path}: cannot read plugin file: {message}") from None
    for key in ("Name", "Module"):
        if not config.has_option("Core", key):
            raise StoqPluginException(f"{path}: [Core] {key} is missing")
    return config


def _module_file(stoq_file: Path, module: str) -> Path:
    base = stoq_file.parent
    for candidate in (base / f"{module}.py", base / module / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise StoqPluginException(
        f"{stoq_file}: [Core] Module {module}: no {module}.py or {module}/__init__.py beside it"
    )


class PluginRegistry:
    """Every plugin that can be loaded, by name."""

    def __init__(self, plugin_dirs: Iterable[Path] = (), use_entry_points: bool = True) -> None:
        self.specs: Dict[str, PluginSpec] = {}
        # Which plugin replaced which, one line each: deliberate, but never silent.
        self.notes: List[str] = []
        problems: List[str] = []
        for plugin_dir in plugin_dirs:
            problems += self._scan_dir(Path(plugin_dir))
        if problems:  # every broken .stoq file at once, not one per attempt
            raise StoqPluginException("\n".join(problems))
        if use_entry_points:
            self._scan_entry_points()

    def _scan_dir(self, plugin_dir: Path) -> List[str]:
        if not plugin_dir.is_dir():
            return [f"plugin directory {plugin_dir} does not exist"]
        problems: List[str] = []
        here: Dict[str, Path] = {}
        for stoq_file in sorted(plugin_dir.rglob("*.stoq")):
            try:
                config = _read_stoq_file(stoq_file)
                name = config.get("Core", "Name")
                module_file = _module_file(stoq_file, config.get("Core", "Module"))
            except StoqPluginException as exc:
                problems.append(str(exc))
                continue
            if name in here:  # two of one name in one directory: which one is meant?
                problems.append(f"{stoq_file}: plugin {name} is already defined by {here[name]}")
                continue
            here[name] = stoq_file
            if name in self.specs:  # the first directory listed wins
                self.notes.append(
                    f"plugin {name}: {self.specs[name].origin} is used; {stoq_file} is not"
                )
                continue
            self.specs[name] = PluginSpec(name, config, str(stoq_file), module_file=module_file)
        return problems

    def _scan_entry_points(self) -> None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self.specs:
                self.notes.append(
                    f"plugin {ep.name}: {self.specs[ep.name].origin} replaces the installed "
                    f"{ep.value}"
                )
                continue
            config = ConfigParser()
            stoq_file = _entry_point_stoq_file(ep.module, ep.name)
            if stoq_file is not None:
                config = _read_stoq_file(stoq_file)
            else:
                config.read_dict({"Core": {"Name": ep.name, "Module": ep.module}})
            self.specs[ep.name] = PluginSpec(
                ep.name, config, f"entry point {ep.value}", entry_point=ep.value
            )

    def names(self) -> List[str]:
        return sorted(self.specs)

    def spec(self, name: str) -> PluginSpec:
        try:
            return self.specs[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise StoqPluginNotFound(f"unknown plugin {name} (known plugins: {known})") from None

    def plugin_class(self, name: str) -> type:
        spec = self.spec(name)
        try:
            if spec.entry_point is not None:
                module_name, _, attr = spec.entry_point.partition(":")
                module = importlib.import_module(module_name)
                if attr:
                    return getattr(module, attr)  # type: ignore[no-any-return]
            else:
                assert spec.module_file is not None
                module = _import_file(name, spec.module_file)
        except StoqPluginException:
            raise
        except Exception as exc:  # a plugin's import can raise anything
            raise StoqPluginException(
                f"plugin {name}: cannot import {spec.origin}: {type(exc).__name__}: {exc}"
            ) from None
        return _find_plugin_class(name, module)

    def kind(self, name: str) -> str:
        """``worker``, ``provider``, ... (imports the plugin)."""
        cls = self.plugin_class(name)
        kinds = [kind for kind, base in PLUGIN_CLASSES.items() if issubclass(cls, base)]
        return ", ".join(kinds) or "unknown"

    def load(self, name: str, layered_opts: Optional[Dict[str, Any]] = None) -> BasePlugin:
        """Build plugin ``name``; ``layered_opts`` (stoq.cfg, then command line) win over
        the ``.stoq [options]``."""
        spec = self.spec(name)
        cls = self.plugin_class(name)
        opts: Dict[str, Any] = {**spec.default_options(), **(layered_opts or {})}
        try:
            plugin = cls(spec.config, opts)
        except StoqPluginException as exc:
            raise StoqPluginException(_prefixed(name, str(exc))) from None
        except Exception as exc:
            raise StoqPluginException(
                f"plugin {name}: rejected its options: {type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(plugin, BasePlugin):
            raise StoqPluginException(f"plugin {name}: {cls.__name__} is not a stoQ plugin")
        return plugin


def _prefixed(name: str, message: str) -> str:
    return message if message.startswith(f"plugin {name}") else f"plugin {name}: {message}"


def _entry_point_stoq_file(module_name: str, name: str) -> Optional[Path]:
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        return None
    candidate = Path(spec.origin).parent / f"{name}.stoq"
    return candidate if candidate.is_file() else None


def _import_file(name: str, path: Path) -> ModuleType:
    """Import a plugin-directory module under a private name, siblings importable."""
    # Named by path too: two plugin directories may each hold a plugin called ``name``.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_name = f"stoq_plugins.{name}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    is_package = path.name == "__init__.py"
    spec = importlib.util.spec_from_file_location(
        module_name, path, submodule_search_locations=[str(path.parent)] if is_package else None
    )
    if spec is None or spec.loader is None:
        raise StoqPluginException(f"plugin {name}: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    # stoQ v2 plugins import helper modules that sit beside them.
    plugin_dir = str(path.parent.parent if is_package else path.parent)
    if plugin_dir not in sys.path:
        sys.path.append(plugin_dir)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _find_plugin_class(name: str, module: ModuleType) -> type:
    bases = tuple(PLUGIN_CLASSES.values())
    found = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, bases)
        and obj not in bases
        and obj.__module__ == module.__name__
    ]
    if len(found) != 1:
        what = "no plugin class" if not found else f"{len(found)} plugin classes"
        raise StoqPluginException(f"plugin {name}: module {module.__name__} defines {what}")
    return found[0]
