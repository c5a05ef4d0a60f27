"""The CSV form of a results table (search results, learning-curve points): one column per
key of the first row, floats to 6 significant digits, None as an empty cell."""
from __future__ import annotations

import csv
import io
from typing import Any, Mapping, Sequence


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """``rows`` as CSV text (a header line, then one line per row; "" for no rows)."""
    cols = list(rows[0]) if rows else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r[c] is None else (f"{r[c]:.6g}" if isinstance(r[c], float) else r[c])
                    for c in cols])
    return buf.getvalue()
