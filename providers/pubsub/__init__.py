"""The pubsub provider plugin."""
