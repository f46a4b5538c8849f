"""mkdocs hooks: the benchmark tables, generated from the recorded run.

``<!-- benchmarks: latest.json -->`` in a page becomes
``benchmarks._report.markdown()`` of ``benchmarks/latest.json``: the same
code that writes ``benchmarks/RESULTS.md``, so no number is typed by hand.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARKER = "<!-- benchmarks: latest.json -->"


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks._report import markdown as report

    result = json.loads((ROOT / "benchmarks" / "latest.json").read_text())
    table = report(result).replace("\n## ", "\n### ", 1)
    if table.startswith("## "):
        table = "#" + table
    return markdown.replace(MARKER, table)
