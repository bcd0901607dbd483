"""Passwords in URLs never reach a log line."""

from __future__ import annotations

import logging

import pytest

from dramaturg.masking import install_log_masking, mask_text, mask_url


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("amqp://shop:s3cret@mq:5672/%2F", "amqp://shop:***@mq:5672/%2F"),
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("rediss://default:s3cret@cache/1", "rediss://default:***@cache/1"),
        ("redis://cache:6379/0?password=s3cret&db=1", "redis://cache:6379/0?password=***&db=1"),
        ("connecting to 'amqp://a:b@h/' failed", "connecting to 'amqp://a:***@h/' failed"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:it's secret@cache:6379/0", "redis://:***@cache:6379/0"),
        ('redis://:say "hi"@cache/0', "redis://:***@cache/0"),
        ("amqp://shop:p@ss@mq:5672/", "amqp://shop:***@mq:5672/"),
        ("url='amqp://shop:pw@mq'", "url='amqp://shop:***@mq'"),
        ("no url here", "no url here"),
        # a password that was not percent-encoded is masked whole, up to the last '@' before the host
        ("amqp://shop:pa/ss@mq:5672/%2F", "amqp://shop:***@mq:5672/%2F"),
        ("redis://:a?b#c@cache:6379/0", "redis://:***@cache:6379/0"),
        ("amqps://shop:x/y?z#w@mq/", "amqps://shop:***@mq/"),
        ("redis://:p/w@[::1]:6379/0 failed", "redis://:***@[::1]:6379/0 failed"),
        ("from amqp://a:p/1@h1/ to redis://:p/2@h2/0", "from amqp://a:***@h1/ to redis://:***@h2/0"),
        ("'amqp://shop:pa/ss@mq'\nnext line user@example.com", "'amqp://shop:***@mq'\nnext line user@example.com"),
    ],
)
def test_mask_text(text: str, masked: str) -> None:
    assert mask_text(text) == masked


def test_mask_url_keeps_none() -> None:
    assert mask_url(None) is None


def test_every_log_record_is_masked_including_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    # Given masking installed, as bootstrap() and the CLI do
    install_log_masking()
    logger = logging.getLogger("some.library")

    # When any library logs a URL with a password, as an argument or inside an exception
    with caplog.at_level(logging.INFO):
        logger.info("connecting to %s", "amqp://shop:s3cret@mq:5672/")
        try:
            raise ConnectionError("cannot reach redis://:s3cret@cache:6379/0")
        except ConnectionError:
            logger.exception("gave up")

    # Then nothing printed holds the password
    text = caplog.text
    assert "s3cret" not in text
    assert "amqp://shop:***@mq:5672/" in text
    assert "redis://:***@cache:6379/0" in text
