"""HubConfig: the seed's defaults, validation that names the field, origin normalising."""

from __future__ import annotations

import dataclasses

import pytest

from roomcast.shared.config import HubConfig

INT_FIELDS = (
    "max_connections",
    "max_message_size",
    "ping_interval_ms",
    "pong_timeout_ms",
    "send_buffer_limit",
)


def test_seed_defaults() -> None:
    """A bare HubConfig has exactly the seed's defaults."""
    config = HubConfig()
    assert config.max_connections == 10_000
    assert config.max_message_size == 65_536
    assert config.ping_interval_ms == 30_000
    assert config.pong_timeout_ms == 10_000
    assert config.enable_compression is False
    assert config.allowed_origins == ()
    assert config.send_buffer_limit > 0


def test_intervals_in_seconds() -> None:
    """ping_interval and pong_timeout convert milliseconds to seconds."""
    config = HubConfig(ping_interval_ms=1500, pong_timeout_ms=250)
    assert config.ping_interval == 1.5
    assert config.pong_timeout == 0.25


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_ints_rejected(name: str, value: int) -> None:
    """Zero and negative limits raise ValueError naming the field."""
    with pytest.raises(ValueError, match=name):
        HubConfig(**{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("value", [True, "100", 1.5, None])
def test_non_int_limits_rejected(name: str, value: object) -> None:
    """bool, str, float and None limits raise TypeError naming the field."""
    with pytest.raises(TypeError, match=name):
        HubConfig(**{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [1, "yes", None])
def test_enable_compression_must_be_bool(value: object) -> None:
    """enable_compression accepts only a real bool."""
    with pytest.raises(TypeError, match="enable_compression"):
        HubConfig(enable_compression=value)  # type: ignore[arg-type]


def test_origins_normalised() -> None:
    """Origins are stripped, lower-cased, lose a trailing slash, and become a tuple."""
    config = HubConfig(
        allowed_origins=[" HTTPS://Example.COM/ ", "http://localhost:8080"]  # type: ignore[arg-type]
    )
    assert config.allowed_origins == ("https://example.com", "http://localhost:8080")


def test_star_origin_accepted() -> None:
    """'*' is accepted as the allow-all origin."""
    assert HubConfig(allowed_origins=("*",)).allowed_origins == ("*",)


@pytest.mark.parametrize(
    "origin",
    ["example.com", "ftp://example.com", "http://", "https://example.com/path", "", "ws://x"],
)
def test_bad_origin_strings_rejected(origin: str) -> None:
    """An origin that is not http(s)://host[:port] raises ValueError quoting it."""
    with pytest.raises(ValueError, match="allowed origin"):
        HubConfig(allowed_origins=(origin,))


def test_origins_as_one_string_rejected() -> None:
    """A bare string (not a sequence of strings) is a TypeError, not split into chars."""
    with pytest.raises(TypeError, match="allowed_origins"):
        HubConfig(allowed_origins="https://example.com")  # type: ignore[arg-type]


def test_non_str_origin_rejected() -> None:
    """A non-str entry in allowed_origins is a TypeError."""
    with pytest.raises(TypeError, match="origin"):
        HubConfig(allowed_origins=(b"https://example.com",))  # type: ignore[arg-type]


def test_frozen() -> None:
    """HubConfig cannot be changed after creation."""
    config = HubConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_connections = 1  # type: ignore[misc]
