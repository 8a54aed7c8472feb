"""The dirscan provider plugin."""
