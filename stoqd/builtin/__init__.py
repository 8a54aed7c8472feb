"""stoqd's built-in worker, connector and archiver plugins."""
