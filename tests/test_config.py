"""Settings: where they are read from, in which order, and what a mistake looks like."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import dramaturg
from dramaturg.config import find_config_file, load_settings

from .conftest import bin_path, run_cli


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("DRAMATURG_"):
            monkeypatch.delenv(name)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_give_an_embedded_broker_under_the_project(tmp_path: Path) -> None:
    # Given a project with no configuration at all
    write(tmp_path / "pyproject.toml", "[project]\nname = 'shop'\n")

    # When settings are loaded from inside it
    settings = load_settings(cwd=tmp_path)

    # Then the broker needs no server: embedded, in .dramaturg/ of the project
    assert settings.broker.type == "embedded"
    assert settings.broker.url == f"embedded://{tmp_path.resolve() / '.dramaturg' / 'embedded.db'}"
    assert settings.source_of("broker.url") == "default for embedded"
    assert settings.worker.threads == 8


def test_file_overrides_defaults_and_environment_overrides_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a dramaturg.toml that sets the broker and the worker
    config = write(
        tmp_path / "dramaturg.toml",
        '[broker]\nurl = "redis://127.0.0.1:6379/3"\n\n[worker]\nthreads = 3\nmodules = ["shop.tasks"]\n',
    )
    # and an environment variable that overrides one of them
    monkeypatch.setenv("DRAMATURG_WORKER_THREADS", "12")
    monkeypatch.setenv("DRAMATURG_WORKER_QUEUES", "imports, emails")

    settings = load_settings(cwd=tmp_path)

    # Then each value comes from the highest source that sets it, and says so
    assert settings.config_file == config.resolve()
    assert settings.broker.url == "redis://127.0.0.1:6379/3"
    assert settings.source_of("broker.url") == str(config.resolve())
    assert settings.broker.type == "redis"
    assert settings.source_of("broker.type") == "derived from broker.url"
    assert settings.worker.threads == 12
    assert settings.source_of("worker.threads") == "env DRAMATURG_WORKER_THREADS"
    assert settings.worker.modules == ["shop.tasks"]
    assert settings.worker.queues == ["imports", "emails"]
    assert settings.source_of("worker.processes") == "default"


def test_broker_url_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "dramaturg.toml", '[broker]\nurl = "redis://127.0.0.1:6379/0"\n')
    monkeypatch.setenv("DRAMATURG_BROKER_URL", "amqp://shop:pw@mq.internal:5672/%2F")

    settings = load_settings(cwd=tmp_path)

    assert settings.broker.type == "rabbitmq"
    assert settings.broker.url == "amqp://shop:pw@mq.internal:5672/%2F"


def test_pyproject_tool_section_is_read(tmp_path: Path) -> None:
    pyproject = write(
        tmp_path / "pyproject.toml",
        "[project]\nname = 'shop'\n\n[tool.dramaturg.broker]\ntype = 'rabbitmq'\n\n"
        "[tool.dramaturg.worker]\nprocesses = 3\n",
    )
    nested = tmp_path / "src" / "shop"
    nested.mkdir(parents=True)

    # When loaded from a subdirectory of the project
    settings = load_settings(cwd=nested)

    assert settings.config_file == pyproject.resolve()
    assert settings.broker.type == "rabbitmq"
    assert settings.broker.url == "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert settings.worker.processes == 3


def test_dramaturg_toml_wins_over_pyproject_in_the_same_directory(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", "[tool.dramaturg.broker]\ntype = 'rabbitmq'\n")
    config = write(tmp_path / "dramaturg.toml", "[broker]\ntype = 'redis'\n")

    found, root = find_config_file(tmp_path)

    assert found == config.resolve()
    assert root == tmp_path.resolve()


def test_search_stops_at_the_project_root(tmp_path: Path) -> None:
    # Given a config file above a project that has none
    write(tmp_path / "dramaturg.toml", "[broker]\ntype = 'redis'\n")
    project = tmp_path / "project"
    write(project / "pyproject.toml", "[project]\nname = 'other'\n")

    found, root = find_config_file(project)

    # Then the outer file is not used: it belongs to somebody else
    assert found is None
    assert root == project.resolve()


def test_config_file_named_by_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "deploy" / "queue.toml", "[broker]\nurl = 'embedded://data/q.db'\n")
    monkeypatch.setenv("DRAMATURG_CONFIG", str(config))

    settings = load_settings(cwd=tmp_path)

    # Relative embedded paths are resolved against the config file's directory
    assert settings.broker.url == f"embedded://{(tmp_path / 'deploy' / 'data' / 'q.db').resolve()}"


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(dramaturg.ConfigError, match=r"config file not found: .*nope\.toml \(from --config"):
        load_settings(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[broker]\ntype = 'rabit'\n", "broker.type: unknown 'rabit'; did you mean 'rabbitmq'?"),
        ("[broker]\ntyep = 'redis'\n", "broker.tyep: unknown key; did you mean 'type'?"),
        ("[brokr]\ntype = 'redis'\n", "unknown section [brokr]; did you mean 'broker'?"),
        ("[worker]\nthreads = 'eight'\n", "worker.threads: 'eight' is not valid: Input should be a valid integer"),
        (
            "[worker]\nshutdown_timeout = '5 minutes'\n",
            "worker.shutdown_timeout: '5 minutes' is not valid: '5 minutes' is not a duration;"
            " write milliseconds (30000) or a string such as '30s', '5m', '250ms'",
        ),
        ("[broker]\nurl = 'rdis://x'\n", "broker.url: unknown scheme rdis://; did you mean 'redis'?"),
        (
            "[broker]\ntype = 'redis'\nurl = 'amqp://u:secret@h/'\n",
            "broker.type 'redis' does not match broker.url 'amqp://u:***@h/', which is a rabbitmq URL",
        ),
        (
            "[broker]\nmanagement_url = 'ftp://u:secret@mq:15672'\n",
            "broker.management_url: 'ftp://u:***@mq:15672' is not valid: write an http:// or https:// URL",
        ),
        ("[state]\nttl = '1 day'\n", "state.ttl: '1 day' is not valid: '1 day' is not a duration;"),
        ("[state]\nurll = 'redis://x'\n", "state.urll: unknown key; did you mean 'url'?"),
        ("[broker\n", "not valid TOML"),
        # a password holding '/', '?' or '#' that was not percent-encoded: never quoted
        ("[broker]\nurl = 'amqp://shop:se/cret@mq:5672/%2F'\n", "broker.url: not a valid URL: its user or password"),
        ("[broker]\nurl = 'redis://:se?cret@cache:6379/0'\n", "broker.url: not a valid URL: its user or password"),
        ("[state]\nurl = 'redis://:se#cret@cache:6379/0'\n", "state.url: not a valid URL: its user or password"),
        (
            "[broker]\nmanagement_url = 'http://shop:se/cret@mq:15672'\n",
            "broker.management_url: not a valid URL: its user or password",
        ),
        ("[broker]\nurl = 'shop:secret@mq:5672'\n", "broker.url: no scheme"),
        ("[broker]\nurl = 'redis://cache:63x79/0'\n", "broker.url: not a valid URL: its host or port does not parse"),
        ("[state]\nurl = 'cache:6379'\n", "state.url: not a Redis URL"),
        ("[state]\nurl = 'http://cache:6379'\n", "state.url: not a Redis URL"),
        ("[state]\nurl = 'redis://cache:6379/0?socket_timeout=soon'\n", "state.url: not a valid Redis URL"),
        ("[broker]\nconnect_timeout = 0\n", "broker.connect_timeout: 0 is not valid: Input should be greater than 0"),
    ],
)
def test_bad_configuration_names_the_key_the_value_and_the_fix(tmp_path: Path, text: str, message: str) -> None:
    config = write(tmp_path / "dramaturg.toml", text)

    with pytest.raises(dramaturg.ConfigError) as caught:
        load_settings(cwd=tmp_path)

    assert message in str(caught.value)
    assert "secret" not in str(caught.value)
    if "TOML" in message:
        assert str(config.resolve()) in str(caught.value)
    else:
        assert f"(from {config.resolve()})" in str(caught.value)


def test_a_mistyped_environment_variable_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRAMATURG_BROKER_URLL", "redis://x")

    with pytest.raises(dramaturg.ConfigError, match="DRAMATURG_BROKER_URLL: not a dramaturg setting; did you mean "):
        load_settings(cwd=tmp_path)


def test_a_bad_environment_value_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRAMATURG_BROKER_TYPE", "rabit")

    with pytest.raises(dramaturg.ConfigError) as caught:
        load_settings(cwd=tmp_path)

    assert str(caught.value) == (
        "broker.type: unknown 'rabit'; did you mean 'rabbitmq'? (from env DRAMATURG_BROKER_TYPE)"
    )


def test_passwords_are_masked_in_repr_and_flat_view(tmp_path: Path) -> None:
    write(
        tmp_path / "dramaturg.toml",
        '[broker]\nurl = "amqp://shop:hunter2@mq:5672/%2F"\nmanagement_url = "http://shop:hunter2@mq:15672"\n'
        '[state]\nurl = "redis://:hunter2@cache:6379/3"\n',
    )

    settings = load_settings(cwd=tmp_path)

    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings)
    assert settings.flat()["broker.url"] == "amqp://shop:***@mq:5672/%2F"
    assert settings.flat()["broker.management_url"] == "http://shop:***@mq:15672"
    assert settings.flat()["state.url"] == "redis://:***@cache:6379/3"
    # while the broker itself still gets the real URL
    assert settings.broker.url == "amqp://shop:hunter2@mq:5672/%2F"


def test_durations_in_files(tmp_path: Path) -> None:
    write(tmp_path / "dramaturg.toml", "[broker]\ntype = 'redis'\nheartbeat_timeout = '15s'\n")

    assert load_settings(cwd=tmp_path).broker.heartbeat_timeout == 15_000


def test_a_bad_list_item_names_the_variable_that_set_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "dramaturg.toml", "[worker]\nmodules = ['shop.tasks']\n")
    monkeypatch.setenv("DRAMATURG_WORKER_MODULES", '["ok", 1]')

    with pytest.raises(
        dramaturg.ConfigError, match=r"^worker\.modules\.1: 1 is not valid: .*\(from env DRAMATURG_WORKER_MODULES\)$"
    ):
        load_settings(cwd=tmp_path)


def test_a_secret_in_a_value_of_the_wrong_type_is_masked(tmp_path: Path) -> None:
    write(tmp_path / "dramaturg.toml", "[broker]\nurl = ['redis://:s3cret@cache/0']\n")

    with pytest.raises(dramaturg.ConfigError) as caught:
        load_settings(cwd=tmp_path)

    assert "s3cret" not in str(caught.value)
    assert "redis://:***@cache/0" in str(caught.value)


def test_a_config_file_that_is_not_utf8_is_named_with_the_line(tmp_path: Path) -> None:
    config = tmp_path / "dramaturg.toml"
    config.write_bytes(b"[broker]\ntype = 'redis'\nnamespace = 'caf\xe9'\n")

    with pytest.raises(dramaturg.ConfigError) as caught:
        load_settings(cwd=tmp_path)

    assert (
        str(caught.value)
        == f"{config.resolve()}: not valid TOML: byte 0xe9 on line 3 is not UTF-8 (save the file as UTF-8)"
    )


def test_a_percent_encoded_password_is_accepted_and_masked(tmp_path: Path) -> None:
    write(tmp_path / "dramaturg.toml", "[broker]\nurl = 'amqp://shop:se%2Fcr%3Fet%23@mq:5672/%2F'\n")

    settings = load_settings(cwd=tmp_path)

    assert settings.flat()["broker.url"] == "amqp://shop:***@mq:5672/%2F"


# -- where the search for a config file stops -------------------------------------------


def config_shown(cwd: Path, **env: str) -> dict[str, Any]:
    """``dramaturg config show --json`` run in ``cwd``, as a user runs it."""
    result = run_cli([bin_path("dramaturg"), "config", "show", "--json"], cwd=cwd, **env)
    assert result.returncode == 0, result.stderr
    shown: dict[str, Any] = json.loads(result.stdout)
    return shown


def test_a_config_file_in_a_directory_everybody_can_write_to_is_not_read(tmp_path: Path) -> None:
    # Given a shared directory like /tmp (anyone may create files in it), where someone
    # left a dramaturg.toml, and a project below it without a config of its own
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    write(shared / "dramaturg.toml", "[broker]\nurl = 'redis://:s3cret@attacker.example:6379/0'\n")
    project = shared / "project" / "src"
    project.mkdir(parents=True)

    # When a command runs in the project
    shown = config_shown(project)

    # Then that file configures nothing
    assert shown["config_file"] is None
    assert shown["settings"]["broker.type"]["value"] == "embedded"


def test_the_search_stops_at_the_home_directory(tmp_path: Path) -> None:
    # Given a dramaturg.toml above the user's home directory
    write(tmp_path / "dramaturg.toml", "[broker]\nurl = 'redis://elsewhere:6379/0'\n")
    home = tmp_path / "home" / "ada"
    project = home / "scratch"
    project.mkdir(parents=True)

    # Then a command run under the home directory does not read it; one in the home directory's own is
    assert config_shown(project, HOME=str(home))["config_file"] is None
    write(home / "dramaturg.toml", "[broker]\nurl = 'redis://mine:6379/0'\n")
    assert config_shown(project, HOME=str(home))["config_file"] == str((home / "dramaturg.toml").resolve())


def test_a_config_file_everybody_can_write_is_refused_with_exit_78(tmp_path: Path) -> None:
    # Given a project's dramaturg.toml that everybody may write
    config = write(tmp_path / "dramaturg.toml", "[broker]\ntype = 'stub'\n")
    config.chmod(0o646)

    # When a command would read it
    result = run_cli([bin_path("dramaturg"), "config", "show"], cwd=tmp_path)

    # Then it refuses in one line that names the file and the fix
    assert result.returncode == 78, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert f"{config.resolve()}: not read: the config file is writable by everybody" in result.stderr
    assert f"chmod go-w {config.resolve()}" in result.stderr

    # while naming it explicitly reads it: the user said which file
    named = run_cli([bin_path("dramaturg"), "--config", str(config), "config", "show"], cwd=tmp_path)
    assert named.returncode == 0, named.stderr


OTHER_UID = 4242


def owned_by_another_user(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``path`` belong to another user: chown as root; otherwise (chown needs root) the
    search is told so through its one seam, the owner it reads."""
    if os.geteuid() == 0:
        os.chown(path, OTHER_UID, OTHER_UID)
        return
    import dramaturg.config as config_module

    real = config_module._owner
    monkeypatch.setattr(
        config_module, "_owner", lambda p, status: OTHER_UID if p.resolve() == path.resolve() else real(p, status)
    )


def test_the_search_stops_before_a_directory_of_another_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given another user's directory holding a dramaturg.toml, and my project below it
    other = tmp_path / "other"
    write(other / "dramaturg.toml", "[broker]\ntype = 'redis'\n")
    project = other / "mine"
    project.mkdir()
    owned_by_another_user(other, monkeypatch)

    # Then the search does not look there
    assert find_config_file(project) == (None, project.resolve())
    assert load_settings(cwd=project).broker.type == "embedded"


def test_a_config_file_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "dramaturg.toml", "[broker]\ntype = 'redis'\n")
    owned_by_another_user(config, monkeypatch)

    with pytest.raises(
        dramaturg.ConfigError, match=rf"not read: the config file is owned by another user \(uid {OTHER_UID}\)"
    ):
        load_settings(cwd=tmp_path)


def test_a_config_file_its_group_can_write_is_refused_unless_the_group_is_yours_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dramaturg.config as config_module

    # Given a dramaturg.toml its group may write (umask 002 makes every file so)
    config = write(tmp_path / "dramaturg.toml", "[broker]\ntype = 'stub'\n")
    config.chmod(0o664)

    # Then it is read when that group is your user-private group...
    monkeypatch.setattr(config_module, "group_is_yours_alone", lambda gid: True)
    assert load_settings(cwd=tmp_path).broker.type == "stub"

    # ...and refused when others are in it
    if os.geteuid() == 0:
        monkeypatch.undo()
        os.chown(config, -1, 65534)  # nogroup: not root's primary group
    else:  # only root can give a file to a group it is not in
        monkeypatch.setattr(config_module, "group_is_yours_alone", lambda gid: False)
    with pytest.raises(dramaturg.ConfigError, match="not read: the config file is writable by its group"):
        load_settings(cwd=tmp_path)


def _value_at(settings: Any, key: str) -> Any:
    value = settings
    for part in key.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def test_settings_handed_to_a_worker_as_data_read_as_the_models_do(tmp_path: Path) -> None:
    from dramaturg.settings_data import decode, encode

    # Given settings from a file with every kind of value: nested tables, a dict, lists, a password
    write(
        tmp_path / "dramaturg.toml",
        '[broker]\nurl = "redis://:hunter2@127.0.0.1:6379/0"\n\n[worker]\nmodules = ["shop.tasks"]\n'
        '\n[context]\ndefault = { store = "main", limits = [1, 2] }\n\n[queues.imports]\nttr = "2m"\n'
        '\n[dashboard]\ntoken = "s3cret-token"\n',
    )
    settings = load_settings(cwd=tmp_path)

    # When they are handed over as JSON and read back, as a worker process reads them
    data = decode(json.loads(json.dumps(encode(settings))))

    # Then every setting reads the same, and so do where each came from and the file
    for key in settings.flat():
        assert _value_at(data, key) == _value_at(settings, key), key
    assert data.context.default == {"store": "main", "limits": [1, 2]}
    assert data.config_file == settings.config_file == (tmp_path / "dramaturg.toml").resolve()
    assert data.source_of("broker.url") == settings.source_of("broker.url")
    assert data.source_of("queues.imports.ttr") == settings.source_of("queues.imports.ttr")
    assert data.source_of("tasks.ttr") == "default"
    # and they are read-only, with the password masked when shown
    with pytest.raises(AttributeError):
        data.broker.url = "redis://elsewhere"  # type: ignore[misc]
    assert "hunter2" not in repr(data) and "redis://:***@127.0.0.1:6379/0" in repr(data)
    # and a secret setting too, whose value is there for the code that asks for it
    assert data.dashboard.token.get_secret_value() == "s3cret-token"
    assert "s3cret-token" not in repr(data) and "s3cret-token" not in str(data.dashboard.token)


def test_a_section_of_any_shape_is_handed_over_without_code_of_its_own() -> None:
    from pydantic import BaseModel

    from dramaturg.settings_data import _decode, _encode

    # Given a section no code here knows: a list of tables, each with a property
    class Entry(BaseModel):
        actor: str
        every_ms: int = 60_000

        @property
        def every_s(self) -> float:
            return self.every_ms / 1000

    class Schedules(BaseModel):
        entries: list[Entry] = []

    # When it is handed over as JSON
    data = _decode(json.loads(json.dumps(_encode(Schedules(entries=[Entry(actor="report"), Entry(actor="b")])))))

    # Then it reads as the models do, properties included
    assert [entry.actor for entry in data.entries] == ["report", "b"]
    assert data.entries[0].every_ms == 60_000 and data.entries[0].every_s == 60.0
