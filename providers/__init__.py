"""stoqd's provider plugins, installed as ``stoqd_providers`` (see pyproject.toml)."""
