"""Runnable examples: ``python -m examples.payments_api`` and ``python -m examples.retry_session``."""
