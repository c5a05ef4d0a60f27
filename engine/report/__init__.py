"""The model report: one self-contained HTML page people look at (``deeptransfer report``).

    data = collect(executor, "model/", "features.zarr")   # data.py: numbers and galleries
    page = render(data)                                   # html.py: the page

``write_report`` does both and writes the page atomically.
"""
from __future__ import annotations

import sys
import types
from typing import Any, Mapping

from .data import ReportData, ReportOptions, check_out, collect
from .html import GENERATOR, render

__all__ = ["ReportData", "ReportOptions", "collect", "render", "write_report", "check_out",
           "GENERATOR"]


def write_report(executor: Any, model_dir: str, store_url: str, out: str,
                 options: ReportOptions | None = None, *,
                 storage_options: Mapping | None = None) -> ReportData:
    """Compute the report and write ``out`` (an .html file; the umask's mode)."""
    from ..files import atomic_write

    check_out(out)
    data = collect(executor, model_dir, store_url, options, storage_options=storage_options)
    atomic_write(out, render(data))
    return data


class _CallableModule(types.ModuleType):
    """Importing this package sets ``deeptransfer.report`` to it, over the API function of
    that name: calling the package is calling the function, so ``dt.report(...)`` works
    whichever of the two the attribute holds."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from ..api import report

        return report(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
