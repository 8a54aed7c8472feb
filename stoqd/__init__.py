"""stoqd: a supervised, multi-process file-scanning daemon for stoQ plugins."""

__version__ = "0.1.0"
