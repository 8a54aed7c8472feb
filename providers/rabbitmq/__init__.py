"""The rabbitmq provider plugin."""
