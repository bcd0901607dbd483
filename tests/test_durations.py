"""Durations: one parser and one formatter, and the same forms wherever a duration is taken."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import dramatiq
import pytest

import dramaturg
from dramaturg.cli import common
from dramaturg.durations import format_ms, parse_ms
from dramaturg.task import Task

#: One minute in each form a duration takes.
A_MINUTE = [60_000, "60000", "60s", "1m", "60000ms", timedelta(minutes=1)]


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (250, 250),
        ("250ms", 250),
        ("30s", 30_000),
        ("5m", 300_000),
        ("2h", 7_200_000),
        ("1d", 86_400_000),
        ("1500", 1500),
        (" 2 s ", 2_000),
        (timedelta(seconds=1.5), 1500),
        ("0.5s", 500),
        (1500.0, 1500),
        (2.9, 2),  # a float is milliseconds too; the fraction is dropped
        (0, 0),
    ],
)
def test_a_duration_in_each_of_its_forms(value: Any, ms: int) -> None:
    assert parse_ms(value) == ms


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("5 minutes", "'5 minutes' is not a duration; write milliseconds (30000) or a string such as '30s'"),
        ("soon", "'soon' is not a duration"),
        ("-5s", "'-5s' is not a duration"),
        (None, "None is not a duration"),
        (True, "True is not a duration"),
        (float("nan"), "nan is not a duration"),
        (-1, "a duration cannot be negative, got -1"),
        (-0.5, "a duration cannot be negative, got -0.5"),
        (timedelta(seconds=-1), "a duration cannot be negative"),
    ],
)
def test_what_is_not_a_duration_is_refused_by_name(value: Any, problem: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_ms(value)
    assert str(caught.value).startswith(problem)


def test_a_refused_duration_says_what_took_it() -> None:
    with pytest.raises(ValueError, match=r"^--budget: 'soon' is not a duration"):
        parse_ms("soon", what="--budget")


@pytest.mark.parametrize(
    ("ms", "text"),
    [(1_800_000, "30m"), (7_200_000, "2h"), (90_000, "90s"), (1_500, "1500ms"), (0, "0ms"), (61_000, "61s")],
)
def test_a_duration_is_written_in_the_largest_unit_that_divides_it(ms: int, text: str) -> None:
    assert format_ms(ms) == text
    assert parse_ms(text) == ms


# -- every place that takes a duration takes the same forms -----------------------------


@pytest.mark.parametrize("delay", A_MINUTE)
def test_retry_takes_every_form_of_duration(delay: Any) -> None:
    task = Task(dramatiq.Message(queue_name="imports", actor_name="import_user", args=(), kwargs={}, options={}))

    with pytest.raises(dramaturg.Retry) as caught:
        task.retry(delay)

    assert caught.value.delay_ms == 60_000
    assert dramaturg.Retry(delay).delay_ms == 60_000
    assert dramaturg.Retry().delay_ms is None  # the actor's backoff


@pytest.mark.parametrize("delay", A_MINUTE)
def test_suspend_queue_takes_every_form_of_duration(delay: Any) -> None:
    assert dramaturg.SuspendQueue(delay).delay_ms == 60_000


@pytest.mark.parametrize("extension", A_MINUTE)
def test_touch_takes_every_form_of_duration(extension: Any) -> None:
    # Given a task whose time to run is a second, run inline
    dramaturg.bootstrap(dramaturg.Settings(broker={"url": "eager://"}))
    seen: list[int | None] = []

    @dramaturg.actor(queue_name="imports", ttr=1_000, max_retries=0)
    def long_import() -> None:
        task = dramaturg.current_task()
        # When it touches its deadline for a minute
        task.touch(extension)
        seen.append(task.time_left())

    long_import.send()

    # Then a minute is left
    [left] = seen
    assert left is not None and 59_000 <= left <= 60_000


@pytest.mark.parametrize("budget", A_MINUTE)
def test_drain_takes_every_form_of_duration(budget: Any) -> None:
    dramaturg.bootstrap(dramaturg.Settings(broker={"url": "stub://"}))

    @dramaturg.actor(queue_name="nightly")
    def report() -> None: ...

    summary = dramaturg.drain(["nightly"], budget=budget, grace=budget, until_empty=True, threads=1)

    assert summary.processed == 0


@pytest.mark.parametrize("ttr", A_MINUTE)
def test_settings_and_options_take_every_form_of_duration(ttr: Any) -> None:
    assert dramaturg.Settings(tasks={"ttr": ttr}).tasks.ttr == 60_000
    if isinstance(ttr, str):
        assert common.duration_ms(ttr, "--ttr") == 60_000


@pytest.mark.parametrize(
    ("refused", "what"),
    [
        (lambda: dramaturg.Retry("soon"), "retry"),
        (lambda: dramaturg.SuspendQueue("soon"), "SuspendQueue"),
        (lambda: dramaturg.drain(["nightly"], budget="soon"), r"drain\(budget=...\)"),
    ],
)
def test_a_bad_duration_is_refused_naming_what_took_it(refused: Any, what: str) -> None:
    with pytest.raises(ValueError, match=rf"^{what}: 'soon' is not a duration"):
        refused()


def test_a_bad_touch_is_refused_naming_it() -> None:
    dramaturg.bootstrap(dramaturg.Settings(broker={"url": "eager://"}))
    errors: list[str] = []

    @dramaturg.actor(queue_name="imports", ttr=1_000, max_retries=0)
    def long_import() -> None:
        try:
            dramaturg.current_task().touch("soon")
        except ValueError as error:
            errors.append(str(error))

    long_import.send()

    assert len(errors) == 1
    assert errors[0].startswith("touch: 'soon' is not a duration; write milliseconds (30000)")
