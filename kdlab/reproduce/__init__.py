"""The papers' result tables as data and the runner that re-measures them (`kdlab reproduce`)."""
from kdlab.reproduce.table import METRICS, Row, load_rows, select_rows

__all__ = ["METRICS", "Row", "load_rows", "select_rows"]
