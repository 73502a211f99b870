"""Tillwire: the connection server for a retail chain's terminals."""

__version__ = "0.1.0"
