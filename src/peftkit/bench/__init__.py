"""Measurement and reports: `peftkit compare` runs methods under one budget (compare.py) and writes the
results as markdown, CSV, JSON, PNG plots and one self-contained HTML page (report.py)."""

from peftkit.bench.compare import DEFAULT_METHODS, compare, measurement_context, skip_reason
from peftkit.bench.report import write_reports

__all__ = ["DEFAULT_METHODS", "compare", "measurement_context", "skip_reason", "write_reports"]
