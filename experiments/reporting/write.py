"""Where the report goes: ``study_tables.md`` and the figures, and a hand-written document.

:func:`report` writes the tables (:mod:`experiments.reporting.tables`) and the figures
(:mod:`experiments.reporting.plots`) of a directory of kept summaries; :func:`splice` puts the
tables into a document between its :data:`BEGIN` and :data:`END` markers.
"""

from __future__ import annotations

import pathlib

from experiments.reporting.plots import figures
from experiments.reporting.summaries import load
from experiments.reporting.tables import tables

# The generated block of a hand-written document (``--splice``): everything between the two
# markers is the report's, everything outside them the author's.
BEGIN = "<!-- report:tables:begin -->"
END = "<!-- report:tables:end -->"


def report(summaries: str | pathlib.Path, out: str | pathlib.Path) -> str:
    """Writes ``study_tables.md`` and the figures to ``out``; returns the tables."""
    records = load(summaries)
    out = pathlib.Path(out)
    text = tables(records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_tables.md").write_text(text)
    figures(records, out)
    return text


def splice(document: str, tables_text: str) -> str:
    """Replaces the block between ``BEGIN`` and ``END`` in ``document`` with the tables.

    The tables go in from their first ``## `` section on (the page title and preamble of
    ``study_tables.md`` stay out), each heading one level deeper, so that they sit under a
    section of the host document. Splicing the same tables twice changes nothing.
    """
    if document.count(BEGIN) != 1 or document.count(END) != 1:
        raise ValueError(f"the document must hold {BEGIN!r} and {END!r} once each; it has "
                         f"{document.count(BEGIN)} and {document.count(END)}")
    head, rest = document.split(BEGIN)
    if END not in rest:
        raise ValueError(f"{END!r} comes before {BEGIN!r}")
    _, tail = rest.split(END)
    start = tables_text.find("\n## ")
    if start < 0:
        raise ValueError("the tables have no '## ' section to splice")
    body = "\n".join("#" + line if line.startswith("#") else line
                      for line in tables_text[start + 1:].rstrip("\n").split("\n"))
    return f"{head}{BEGIN}\n\n{body}\n\n{END}{tail}"


def splice_file(path: str | pathlib.Path, tables_text: str) -> pathlib.Path:
    """Splices the tables into the document at ``path`` (:func:`splice`) and writes it back
    atomically: a failed write, or a document :func:`splice` rejects (``ValueError``), leaves
    it as it was."""
    path = pathlib.Path(path)
    spliced = splice(path.read_text(), tables_text)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(spliced)
    tmp.replace(path)
    return path
