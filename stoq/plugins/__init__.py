"""stoQ v2's ``stoq.plugins``: the plugin base classes."""

from stoqd.framework.plugins import (
    ArchiverPlugin,
    BasePlugin,
    ConnectorPlugin,
    DecoratorPlugin,
    DispatcherPlugin,
    ProviderPlugin,
    WorkerPlugin,
)

__all__ = [
    "ArchiverPlugin", "BasePlugin", "ConnectorPlugin", "DecoratorPlugin",
    "DispatcherPlugin", "ProviderPlugin", "WorkerPlugin",
]  # fmt: skip
