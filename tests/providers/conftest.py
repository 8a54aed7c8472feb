"""Fixtures for the provider tests.

Directory providers (dirmon, dirscan): fixtures prefixed ``dir_``. Queue providers:
fixtures prefixed ``mq_``.
"""

from __future__ import annotations

from services import mq_pubsub, mq_rabbitmq  # noqa: F401  (queue brokers: tests/services.py)
