"""What the documentation site generates from the code at build time (a MkDocs hook).

``<!-- config-reference -->`` in a page is replaced by the configuration reference: one
table per section of :class:`dramaturg.config.Settings`, each key with its environment
variable, type, default and meaning. The meaning is the ``#:`` comment above the field in
``src/dramaturg/config.py`` (a ``#: Default: ...`` line there says the default in words,
where the value alone would mislead: ``None`` that means "from the URL", a default
computed on the machine). A field with no ``#:`` comment, or a page that lost the marker,
fails the build: the reference cannot drift from the settings model.

Nothing here imports MkDocs, so ``tests/test_docs.py`` can check the reference without
the docs dependency group: ``python docs/_hooks/reference.py`` prints it.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import types
import typing
from typing import Any, Literal, get_args, get_origin

MARKER = "<!-- config-reference -->"
PAGE = "configuration.md"

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|exc|data|obj|const):`(~?)([^`]+)`")


def rest_to_markdown(text: str) -> str:
    """The reST habits of the docstrings, in Markdown: roles as code, literal blocks
    (``Example::`` and an indented block) and doctest lines (``>>>``) as fenced code."""
    text = _ROLE.sub(lambda m: f"``{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}``", text)
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        base = _indent(line)
        if line.rstrip().endswith("::"):
            block, j = [], i + 1
            while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
                block.append(lines[j])
                j += 1
            while block and not block[-1].strip():
                block.pop()
            while block and not block[0].strip():
                block.pop(0)
            if block:
                lead = line.rstrip()[:-2].rstrip()
                inner = min(_indent(b) for b in block if b.strip())
                pad = " " * base
                out += [lead + ":"] if lead.strip() else []
                out += ["", pad + "```", *(pad + b[inner:] if b.strip() else "" for b in block), pad + "```", ""]
                i = j
                continue
        if line.lstrip().startswith(">>>"):
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][base:])
                i += 1
            pad = " " * base
            out += ["", pad + "```pycon", *(pad + b for b in block), pad + "```", ""]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def attribute_comments(source: str) -> dict[str, dict[str, str]]:
    """``{class name: {attribute: comment}}``: the ``#:`` lines right above each
    annotated attribute of each top-level class in ``source``."""
    lines = source.splitlines()
    found: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for statement in node.body:
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                comment = comment_above(lines, statement.lineno)
                if comment:
                    found.setdefault(node.name, {})[statement.target.id] = comment
    return found


def comment_above(lines: list[str], lineno: int) -> str:
    """The ``#:`` comment lines right above line ``lineno`` (1-based), one per line."""
    collected: list[str] = []
    index = lineno - 2
    while index >= 0 and lines[index].strip().startswith("#:"):
        collected.insert(0, lines[index].strip()[2:].strip())
        index -= 1
    return "\n".join(collected)


def _unwrapped(field: Any) -> tuple[Any, list[Any], bool]:
    """A field's type without ``None`` and ``Annotated``, the metadata of both, and whether it may be unset."""
    annotation, metadata, optional = field.annotation, list(field.metadata), False
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        optional = len(args) < len(get_args(annotation))
        annotation = args[0] if len(args) == 1 else annotation
    if get_origin(annotation) is typing.Annotated:
        annotation, *extra = get_args(annotation)
        for item in extra:
            metadata += getattr(item, "metadata", [item])
    return annotation, metadata, optional


def _is_duration(field: Any) -> bool:
    from dramaturg.durations import parse_ms

    return any(getattr(item, "func", None) is parse_ms for item in _unwrapped(field)[1])


def _type(field: Any) -> str:
    annotation, metadata, optional = _unwrapped(field)
    if _is_duration(field):
        text = "duration"
    elif get_origin(annotation) is Literal:
        text = " \\| ".join(f'`"{arg}"`' for arg in get_args(annotation))
    elif annotation is bool:
        text = "`true` \\| `false`"
    elif annotation is int:
        text = "integer"
    elif annotation is str:
        text = "text"
    elif getattr(annotation, "__name__", "") == "SecretStr":
        text = "text (secret: never shown)"
    elif get_origin(annotation) is list:
        text = "list of text" if get_args(annotation)[:1] == (str,) else "list"
    elif get_origin(annotation) is dict:
        text = "table"
    elif isinstance(annotation, type) and hasattr(annotation, "model_fields"):  # an inline table
        text = "table: " + ", ".join(f"`{name}`" for name in annotation.model_fields)
    else:
        raise TypeError(f"the configuration reference cannot describe {annotation!r}; teach docs/_hooks/reference.py")
    limits = {
        name: getattr(item, name) for item in metadata for name in ("ge", "gt", "le", "lt") if hasattr(item, name)
    }
    if text == "integer" and limits:
        text += " " + ", ".join(
            f"{sign} {limits[name]}"
            for name, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))
            if name in limits
        )
    return text + (", or unset" if optional else "")


def _default(field: Any, said: str | None, key: str) -> str:
    if field.is_required():
        return "required"
    if said:
        if field.default is not None and field.default_factory is None:
            # Words beside a value would drift from it: the value is shown as it is.
            raise ValueError(f"{key}: its default is {field.default!r}; drop the '#: Default: ...' line in config.py")
        return said
    if field.default_factory is not None:
        raise ValueError(
            f"{key}: its default is computed; say it in words with a '#: Default: ...' comment in config.py"
        )
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if _is_duration(field):
        from dramaturg.durations import format_ms

        return f'`"{format_ms(value)}"`'
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{json.dumps(value)}`"


def _meaning(comment: str) -> tuple[str, str | None]:
    """A field's comment: its meaning, and the default said in words (``Default: ...``), if any."""
    lines = comment.split("\n")
    said = next((k for k, line in enumerate(lines) if line.startswith("Default:")), len(lines))
    meaning = " ".join(" ".join(lines[:said]).split())
    default = " ".join(" ".join(lines[said:]).removeprefix("Default:").split())
    return rest_to_markdown(meaning), default or None


def _section_doc(model: type) -> str:
    doc = inspect.getdoc(model) or ""
    return rest_to_markdown(doc.split("\n", 1)[1].strip() if "\n" in doc else "")


def config_reference() -> str:
    """The configuration reference, in Markdown, from :mod:`dramaturg.config`."""
    from dramaturg import config

    comments = attribute_comments(inspect.getsource(config))
    parts: list[str] = []
    for section, section_field in config.Settings.model_fields.items():
        model = section_field.annotation
        prefix, env = section, f"{config.ENV_PREFIX}{section.upper()}"
        heading = f"[{section}]"
        if get_origin(model) is dict:  # [queues.<name>]: a table of tables
            model = get_args(model)[1]
            prefix = f"{section}.<name>"
            heading = f"[{prefix}]"
        elif get_origin(model) is list:  # [[schedules]]: an array of tables
            model = get_args(model)[0]
            heading = f"[[{section}]]"
        if not isinstance(model, type) or not hasattr(model, "model_fields"):
            raise TypeError(f"settings section {section!r} is not a model; teach docs/_hooks/reference.py")
        # The first line of a section's docstring is "``[broker]``: which broker, ...".
        title = (inspect.getdoc(model) or "").split("\n", 1)[0].split(": ", 1)[-1]
        parts += [f"### `{heading}` {{#{section}}}", "", rest_to_markdown(title[:1].upper() + title[1:])]
        intro = _section_doc(model)
        if intro:
            parts += ["", intro]
        if prefix != section:
            parts += ["", f'Environment: `{env}` as JSON, e.g. `{env}=\'{{"imports": {{"ttr": "30m"}}}}\'`.']
        elif heading.startswith("[["):
            parts += ["", f"Environment: `{env}` as a JSON list of objects with these keys."]
        parts += ["", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            key = f"{prefix}.{name}"
            comment = comments.get(model.__name__, {}).get(name)
            if not comment:
                raise ValueError(
                    f"{key}: no '#:' comment above the field in src/dramaturg/config.py to say what it means"
                )
            meaning, said = _meaning(comment)
            own_variable = prefix == section and not heading.startswith("[[")
            where = f"`{key}`" + (f"<br>`{env}_{name.upper()}`" if own_variable else "")
            parts.append(f"| {where} | {_type(field)} | {_default(field, said, key)} | {meaning} |")
        parts.append("")
    return "\n".join(parts)


_filled: list[str] = []


def on_page_markdown(markdown: str, *, page: Any, **kwargs: Any) -> str:
    """MkDocs: put the configuration reference where its marker is."""
    if MARKER not in markdown:
        return markdown
    _filled.append(page.file.src_uri)
    return markdown.replace(MARKER, config_reference())


def on_pre_build(**kwargs: Any) -> None:
    _filled.clear()


def on_post_build(**kwargs: Any) -> None:
    if PAGE not in _filled:
        raise RuntimeError(f"docs/{PAGE} lost its {MARKER} marker: the configuration reference was not generated")


if __name__ == "__main__":
    print(config_reference())
