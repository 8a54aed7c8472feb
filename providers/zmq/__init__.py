"""The zmq provider plugin."""
