"""docs/models.md's family x method table, from the family matrix's own test results.

Runs tests/test_families_matrix.py with LEANTUNE_MATRIX_OUT set (each cell writes its outcome), then writes the table
between the markers in docs/models.md. A cell that failed its test shows as "FAILS" (the script exits 1), a cell
that did not run shows as "?".

    python benchmarks/family_table.py            # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "models.md"
BEGIN, END = "<!-- family-table:begin -->", "<!-- family-table:end -->"


def run_matrix() -> tuple[list[dict], dict[tuple[str, str], str]]:
    """(recorded outcomes, {(family, method): 'passed'/'failed'} from pytest's report)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, report = Path(tmp) / "cells.jsonl", Path(tmp) / "report.xml"
        env = {**os.environ, "LEANTUNE_MATRIX_OUT": str(out)}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        "tests/test_families_matrix.py"], cwd=ROOT, env=env, check=False)
        cells = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
        status = {}
        import xml.etree.ElementTree as ET

        for case in ET.parse(report).iter("testcase"):
            name = case.get("name", "")
            if "[" not in name:
                continue
            family, method = name[name.index("[") + 1:-1].rsplit("-", 1)
            status[family, method] = "failed" if case.find("failure") is not None or case.find("error") is not None \
                else "passed"
    return cells, status


def table(cells: list[dict], status: dict) -> str:
    families = list(dict.fromkeys(f for f, _ in status))
    methods = sorted({m for _, m in status})
    got = {(c["family"], c["method"]): c for c in cells}
    lines = ["| family | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    notes: list[str] = []  # one footnote per distinct remark, shared by the cells that have it

    def note(text: str) -> int:
        if text not in notes:
            notes.append(text)
        return notes.index(text) + 1

    for f in families:
        row = []
        for m in methods:
            st, c = status.get((f, m)), got.get((f, m))
            if st == "failed":
                row.append("FAILS")
            elif c is None:
                row.append("?")
            elif c["outcome"] == "refused":
                why = c["detail"]
                row.append(f"refuses [{note(f'{m} refuses at apply: {why}')}]")
            elif "refused" in c["detail"]:
                row.append(f"✓ [{note(c['detail'].split('; PEFT')[0])}]")
            else:
                row.append("✓")
        lines.append(f"| {f} | " + " | ".join(row) + " |")
    return "\n".join(lines + [""] + [f"[{i}] {n}.  " for i, n in enumerate(notes, 1)])


def main() -> int:
    cells, status = run_matrix()
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{table(cells, status)}\n{END}{tail}")
    failed = sorted(k for k, v in status.items() if v == "failed")
    print(f"{len(status)} cells, {len(failed)} failing: {failed}" if failed else f"{len(status)} cells, all pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
