"""The tunegrid coordinator: customer API, worker protocol, placement, money, dashboard."""

__version__ = "0.1.0"
