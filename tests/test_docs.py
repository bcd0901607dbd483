"""The documentation: what the README promises, and what the site is generated from.

The site itself is built by ``make docs`` (``mkdocs build --strict``: a broken link, a
broken anchor or a stale API name fails it), which ``.ci/run`` runs before ``make test``;
these tests check, without the ``docs`` dependency group, what that build cannot: that the
README's two commands still exist, that its links lead somewhere, and that the generated
references cover every setting and every public name.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import dramaturg
from dramaturg.config import known_keys

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# The keys of the configuration table the README held before the reference moved to
# docs/ (and was generated from the settings models): none may go missing.
README_CONFIG_KEYS = [
    "broker.url",
    "broker.type",
    "broker.prefetch",
    "broker.connect_timeout",
    "broker.confirm_delivery",
    "broker.priorities",
    "broker.heartbeat",
    "broker.consumer_timeout",
    "broker.management_url",
    "broker.namespace",
    "broker.heartbeat_timeout",
    "broker.fsync",
    "worker.modules",
    "worker.processes",
    "worker.threads",
    "worker.queues",
    "worker.shutdown_timeout",
    "worker.unknown_actor_grace",
    "worker.max_tasks_per_child",
    "worker.max_memory_mb",
    "worker.metrics_port",
    "worker.metrics_host",
    "log.format",
    "context.default",
    "context.providers",
    "context.restorers",
    "retries.max_retries",
    "retries.min_backoff",
    "retries.max_backoff",
    "state.enabled",
    "state.url",
    "state.ttl",
]


def load_reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_reference", DOCS / "_hooks" / "reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_gives_the_two_commands_and_the_makefile_has_them() -> None:
    # Given the README's "Two commands" section
    section = README.read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]

    # Then it runs the demo and the tests with make, and the Makefile has both targets
    assert "$ make demo" in section
    assert "$ make test" in section
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M)
    assert re.search(r"^test:", makefile, re.M)


def test_every_relative_link_of_the_readme_leads_to_a_file() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    relative = [link for link in links if "://" not in link]
    assert relative, "the README links to the docs pages"
    assert [link for link in relative if not (ROOT / link).exists()] == []


def test_the_configuration_reference_lists_every_setting() -> None:
    # Given the reference the docs build generates from the settings models
    reference = load_reference().config_reference()

    # Then every settings key is a row of it, with its environment variable
    keys = [key for key in known_keys() if key not in ("queues", "schedules")] + ["queues.<name>.ttr", "schedules.cron"]
    for key in keys + README_CONFIG_KEYS:
        assert f"| `{key}`" in reference, key
    assert "`DRAMATURG_WORKER_MAX_TASKS_PER_CHILD`" in reference
    # and defaults read as a user writes them, with the ones that depend on the machine in words
    assert '| `"10m"` |' in reference
    assert "| the CPU count |" in reference
    assert "(Redis and embedded 64, RabbitMQ 128)" in reference


def test_the_configuration_page_has_the_reference_marker() -> None:
    reference = load_reference()
    assert reference.MARKER in (DOCS / reference.PAGE).read_text()


def test_every_public_name_has_an_api_reference_entry() -> None:
    # Given the ::: directives of the API reference pages
    directives = set()
    for page in (DOCS / "reference").glob("*.md"):
        directives |= set(re.findall(r"^::: ([\w.]+)", page.read_text(), re.M))

    # Then each name of dramaturg.__all__ is documented (echo is declared only when asked for)
    documented = {name.removeprefix("dramaturg.") for name in directives}
    documented.add("echo" if "dramaturg.actors.builtin.echo" in directives else "")
    assert sorted(set(dramaturg.__all__) - {"__version__"} - documented) == []


def test_the_reliability_page_keeps_the_chaos_table_markers() -> None:
    # make chaos rewrites the table between these markers (tests/chaos/table.py)
    from tests.chaos import table

    page = (DOCS / "RELIABILITY.md").read_text()
    assert page.index(table.BEGIN) < page.index(table.END)
    assert "docs/RELIABILITY.md" in (ROOT / "Makefile").read_text()


def test_docstrings_in_rest_habits_become_markdown() -> None:
    convert = load_reference().rest_to_markdown
    text = "Build it with :func:`load_settings`; see :class:`~dramaturg.HeldTask`.\n\nExample::\n\n    x = 1\n\n"
    text += ">>> f()\n2"
    assert convert(text).splitlines() == [
        "Build it with ``load_settings``; see ``HeldTask``.",
        "",
        "Example:",
        "",
        "```",
        "x = 1",
        "```",
        "",
        "",
        "```pycon",
        ">>> f()",
        "2",
        "```",
    ]
