"""Self-hosted webhook gateway: accept helpdesk webhooks, keep them in Redis, deliver with retries."""

__version__ = "0.1.0"
