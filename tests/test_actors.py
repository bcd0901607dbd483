"""@dramaturg.actor: declaration-time checks and binding, on the stub broker (pure logic)."""

from __future__ import annotations

import re

import dramatiq
import pytest

import dramaturg
from dramaturg import app

from .conftest import switching_every_microsecond


@pytest.fixture
def stub_settings() -> dramaturg.Settings:
    return dramaturg.Settings(broker={"type": "stub"})


def test_unknown_option_fails_at_decoration_with_the_closest_name() -> None:
    expected = r"@actor 'job': unknown option 'max_retrys'; did you mean 'max_retries'\?"
    with pytest.raises(dramaturg.ActorError, match=expected):

        @dramaturg.actor(max_retrys=3)
        def job() -> None: ...


def test_options_of_the_middleware_stack_are_accepted() -> None:
    @dramaturg.actor(queue_name="q", priority=5, max_retries=2, min_backoff=100, ttr=1000, max_age=60_000)
    def job() -> None: ...

    assert job.options == {"max_retries": 2, "min_backoff": 100, "ttr": 1000, "max_age": 60_000}
    assert job.priority == 5


def test_dramatiq_options_dramaturg_replaces_point_to_their_replacement() -> None:
    with pytest.raises(dramaturg.ActorError, match=r"unknown option 'time_limit'; dramaturg's time limit is ttr"):
        dramaturg.actor(time_limit=1000)(lambda: None)
    with pytest.raises(dramaturg.ActorError, match=r"unknown option 'throws'; .* use hold_on="):
        dramaturg.actor(throws=(ValueError,))(lambda: None)
    with pytest.raises(dramaturg.ActorError, match=r"unknown option 'retry_when'; .*task.retry\(\).*task.hold\(\)"):
        dramaturg.actor(retry_when=lambda retries, error: retries < 3)(lambda: None)
    with pytest.raises(dramaturg.ActorError, match=r"unknown option 'on_retry_exhausted'; .* held .*on_failure="):
        dramaturg.actor(on_retry_exhausted="alert")(lambda: None)


def test_invalid_queue_name_fails_at_decoration() -> None:
    with pytest.raises(dramaturg.ActorError, match="queue_name 'my queue' is not valid"):

        @dramaturg.actor(queue_name="my queue")
        def job() -> None: ...


def test_a_name_taken_by_another_function_is_refused() -> None:
    @dramaturg.actor(actor_name="shared")
    def first() -> None: ...

    with pytest.raises(dramaturg.ActorError, match=r"the name is taken by .*first; pass actor_name="):

        @dramaturg.actor(actor_name="shared")
        def second() -> None: ...


def test_bare_decorator_and_direct_call() -> None:
    @dramaturg.actor
    def add(x: int, y: int) -> int:
        return x + y

    assert isinstance(add, dramatiq.Actor)
    assert add.actor_name == "add"
    assert add.queue_name == "default"
    assert add(2, 3) == 5
    assert add.__doc__ is None and add.__name__ == "add"


def test_send_without_bootstrap_uses_the_configured_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a process that declared an actor and never called bootstrap()
    monkeypatch.setenv("DRAMATURG_BROKER_TYPE", "stub")

    @dramaturg.actor(queue_name="lazy")
    def job(n: int) -> None: ...

    # When it sends
    message = job.send(1)

    # Then the configured broker took the message, and Dramatiq's global broker is that one
    broker = dramatiq.get_broker()
    assert broker is dramaturg.get_broker()
    assert type(broker).__module__ == "dramaturg.brokers.stub"
    assert broker.queues["lazy"].qsize() == 1
    assert message.actor_name == "job"


def test_bootstrap_again_rebinds_every_actor(stub_settings: dramaturg.Settings) -> None:
    @dramaturg.actor(queue_name="rebind")
    def job() -> None: ...

    first = dramaturg.bootstrap(stub_settings)
    second = dramaturg.bootstrap(stub_settings)

    assert job.broker is second is not first
    assert second.get_actor("job") is job
    assert "job" in app.registered_actors()


def test_pickle_is_never_the_encoder(stub_settings: dramaturg.Settings) -> None:
    dramatiq.set_encoder(dramatiq.PickleEncoder())

    dramaturg.bootstrap(stub_settings)

    assert isinstance(dramatiq.get_encoder(), dramatiq.JSONEncoder)


def test_a_pipeline_built_before_bootstrap_uses_the_configured_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a process that never called bootstrap() and a configured stub broker
    monkeypatch.setenv("DRAMATURG_BROKER_TYPE", "stub")
    monkeypatch.setattr(dramatiq.broker, "global_broker", None)

    @dramaturg.actor(queue_name="piped")
    def step(n: int) -> int:
        return n

    # When a pipeline is built and run through Dramatiq's own API
    dramatiq.pipeline([step.message(1), step.message()]).run()

    # Then the configured broker got it, not Dramatiq's localhost RabbitMQ fallback
    assert type(dramatiq.get_broker()).__module__ == "dramaturg.brokers.stub"
    assert dramatiq.get_broker().queues["piped"].qsize() == 1


def test_sends_racing_a_bootstrap_always_find_their_actor_bound(stub_settings: dramaturg.Settings) -> None:
    import threading

    @dramaturg.actor(queue_name="race")
    def job(n: int) -> None: ...

    errors: list[BaseException] = []
    sent: list[str] = []
    stop = threading.Event()

    def send_forever() -> None:
        while not stop.is_set():
            try:
                sent.append(job.send(1).message_id)
            except BaseException as error:
                errors.append(error)
                return

    # Switching threads every microsecond makes the sender land inside bootstrap()'s
    # steps on every run, not on one in a hundred.
    with switching_every_microsecond():
        dramaturg.bootstrap(stub_settings)
        sender = threading.Thread(target=send_forever, daemon=True)
        sender.start()
        try:
            for _ in range(50):
                dramaturg.bootstrap(stub_settings)
        finally:
            stop.set()
            sender.join(timeout=60)
    assert errors == []
    assert sent  # the sender ran alongside


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hold_on": "ValueError"}, "hold_on must be an exception class or a tuple of them, not 'ValueError'"),
        ({"max_retries": -1}, "max_retries must be a whole number >= 0"),
        ({"min_backoff": 1.5}, "min_backoff must be a whole number >= 0 (milliseconds for backoffs), not 1.5"),
    ],
)
def test_bad_option_values_fail_at_decoration(options: dict[str, object], message: str) -> None:
    with pytest.raises(dramaturg.ActorError, match=re.escape(message)):
        dramaturg.actor(**options)(lambda: None)
