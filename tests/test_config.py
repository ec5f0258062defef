"""Settings read from the environment: defaults, parsing, and refusals that say what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from autodispatch.app import create_app
from autodispatch.config import Settings
from conftest import make_settings

INTERVAL = "AUTODISPATCH_REALTIME_PRESENCE_INTERVAL"


def test_presence_interval_defaults_to_five_seconds() -> None:
    """Unset or empty, the alive interval between processes is 5 s."""
    assert Settings.from_env({}, home=Path("/tmp")).realtime_presence_interval == 5.0
    assert Settings.from_env({INTERVAL: ""}, home=Path("/tmp")).realtime_presence_interval == 5.0


@pytest.mark.parametrize(("raw", "seconds"), [("0.5", 0.5), ("2", 2.0), (" 30 ", 30.0)])
def test_presence_interval_is_read_in_seconds(raw: str, seconds: float) -> None:
    """AUTODISPATCH_REALTIME_PRESENCE_INTERVAL is a number of seconds, fractions allowed."""
    settings = Settings.from_env({INTERVAL: raw}, home=Path("/tmp"))
    assert settings.realtime_presence_interval == seconds


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("soon", "must be a number of seconds, not 'soon'"),
        ("0", "must be more than 0 and at most 3600 seconds, not '0'"),
        ("-1", "must be more than 0 and at most 3600 seconds, not '-1'"),
        ("3601", "must be more than 0 and at most 3600 seconds, not '3601'"),
        ("nan", "must be more than 0 and at most 3600 seconds, not 'nan'"),
        ("inf", "must be more than 0 and at most 3600 seconds, not 'inf'"),
    ],
)
def test_a_bad_presence_interval_is_refused_saying_why(raw: str, why: str) -> None:
    """A value that is not a number of seconds in (0, 3600] stops the start with a message
    naming the variable, the rule and the value (above an hour, the other processes would
    ignore this one's presence)."""
    with pytest.raises(SystemExit) as refused:
        Settings.from_env({INTERVAL: raw}, home=Path("/tmp"))
    assert str(refused.value) == f"{INTERVAL} {why}"


def test_the_app_gives_the_presence_interval_to_its_broker(tmp_path: Path) -> None:
    """create_app() passes the setting to the broker, which says alive that often."""
    settings = make_settings(tmp_path, realtime_presence_interval=0.75)
    app = create_app(settings, "postgresql://nowhere.invalid/none")
    assert app.state.gateway.broker.alive_interval == 0.75


@pytest.mark.parametrize(
    "name",
    [
        "AUTODISPATCH_REALTIME_QUEUE_SIZE",
        "AUTODISPATCH_DB_POOL_MAX",
        "AUTODISPATCH_REQUEST_TTL_SECONDS",
        "AUTODISPATCH_ACCESS_TOKEN_TTL",
        "AUTODISPATCH_EVENT_RETENTION_SECONDS",
    ],
)
@pytest.mark.parametrize(
    ("raw", "why"),
    [("0", "must be at least 1, not '0'"), ("-5", "must be at least 1, not '-5'"),
     ("ten", "must be a whole number, not 'ten'")],
)  # fmt: skip
def test_counts_and_durations_below_one_are_refused_saying_why(
    name: str, raw: str, why: str
) -> None:
    """A queue of 0 frames would close every subscriber as a slow consumer, a pool of 0
    would answer nothing: such values stop the start with the setting's name and value."""
    with pytest.raises(SystemExit) as refused:
        Settings.from_env({name: raw}, home=Path("/tmp"))
    assert str(refused.value) == f"{name} {why}"
    Settings.from_env({name: "7"}, home=Path("/tmp"))  # 1 and above are taken
