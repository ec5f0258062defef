"""autodispatch: realtime dispatch of customer session requests to mechanics."""

__version__ = "0.1.0"
