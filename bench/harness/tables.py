"""Markdown table rows, shared by the studies' reports."""
from __future__ import annotations


def md_row(*cells) -> str:
    """``| a | b | c |``"""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def failed_rows(failed: list[dict], columns: int, error_chars: int, last_line: bool = False) -> list[str]:
    """One row per failed entry (``{"label", "error"}``): its label, ``failed:`` and the error's
    end (its last line, ``last_line``), the other cells empty, ``columns`` cells in all."""
    out = []
    for f in failed:
        err = f["error"].strip().splitlines()[-1][:error_chars] if last_line else f["error"][-error_chars:]
        out.append(f"| {f['label']} | failed: {err} |" + " |" * (columns - 2))
    return out
