"""sdrt's version: one place, imported by the runtime, server, export and CLI."""

__version__ = "0.1.0"
