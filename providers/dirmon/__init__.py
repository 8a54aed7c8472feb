"""The dirmon provider plugin."""
