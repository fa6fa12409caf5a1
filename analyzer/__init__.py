"""Offline side: read recorded runs, query them, and (later) attribute."""

from attrib.analyzer.run import Run, open_run
from attrib.analyzer.sql import sql

__all__ = ["Run", "open_run", "sql"]
