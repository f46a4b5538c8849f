"""mkdocs hooks: the benchmark tables, generated from the recorded run.

``<!-- benchmarks: latest.json -->`` in a page becomes
``benchmarks._report.markdown()`` of ``benchmarks/latest.json`` (or of the
recorded run the marker names: ``psycopg.json``): the same code that writes
``benchmarks/RESULTS.md``, so no number is typed by hand.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!-- benchmarks: ([\w.-]+\.json) -->")


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return MARKER.sub(lambda found: _tables(found.group(1)), markdown)


def _tables(name: str) -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks._report import markdown as report

    result = json.loads((ROOT / "benchmarks" / name).read_text())
    table = report(result).replace("\n## ", "\n### ", 1)
    if table.startswith("## "):
        table = "#" + table
    return table
