"""A griffe extension for the API reference (mkdocstrings; see mkdocs.yml).

The code documents attributes with ``#:`` comments above them (dataclass fields, settings)
and writes its docstrings in reST habits (``:func:`x```, ``Example::`` blocks, ``>>>``
lines). This extension gives each attribute its ``#:`` comment as its docstring and turns
those habits into Markdown (see ``reference.rest_to_markdown``), so the docstrings stay as
they are and read well in both places.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import griffe

_spec = importlib.util.spec_from_file_location("_dramaturg_docs_reference", Path(__file__).with_name("reference.py"))
assert _spec is not None and _spec.loader is not None
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)


class HouseDocstrings(griffe.Extension):
    """``#:`` comments as attribute docstrings; reST habits as Markdown."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.is_attribute and obj.docstring is None and obj.lineno and obj.filepath:
            comment = reference.comment_above(obj.lines_collection[obj.filepath], obj.lineno)
            if comment:
                text = comment.replace("\nDefault:", "\n\nDefault:")  # the default, a paragraph of its own
                obj.docstring = griffe.Docstring(text, lineno=obj.lineno, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = reference.rest_to_markdown(obj.docstring.value)
