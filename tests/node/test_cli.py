"""`roomcast serve` settings parsed in-process: the history flags build the HubConfig the
node runs with, and bad values stop it naming the setting (tests/e2e/test_cli.py runs
the real process)."""

from __future__ import annotations

import pytest

from roomcast.node import cli
from roomcast.shared.config import DEFAULT_RECOVERY_MAX, HubConfig
from roomcast.shared.history import History, HistoryPolicy

_HISTORY_ENV = ("ROOMCAST_HISTORY_SIZE", "ROOMCAST_HISTORY_TTL", "ROOMCAST_RECOVERY_MAX")


@pytest.fixture(autouse=True)
def _no_history_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests set the variables they need; none leaks in from the caller's shell."""
    for var in _HISTORY_ENV:
        monkeypatch.delenv(var, raising=False)


def _config(*args: str) -> HubConfig:
    parser = cli._build_parser()
    values = cli._resolve(parser, parser.parse_args(["serve", *args]))
    return cli.build_config(values)


def _refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run ``serve --check args``: it must exit 2; its stderr."""
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--check", *args])
    assert info.value.code == 2
    return capsys.readouterr().err


def test_default_history_is_100_messages_for_300_seconds() -> None:
    """Without flags every room keeps 100 messages for 300 s; one recovery sends <= 1000."""
    config = _config()
    assert config.history == HistoryPolicy(History(100, 300.0))
    assert config.history.for_room("any-room") == History(100, 300.0)
    assert config.recovery_max == DEFAULT_RECOVERY_MAX == 1000


def test_history_flags_build_the_policy() -> None:
    """--history-size, --history-ttl and --recovery-max reach HubConfig."""
    config = _config("--history-size", "25", "--history-ttl", "2.5", "--recovery-max", "7")
    assert config.history == HistoryPolicy(History(25, 2.5))
    assert config.recovery_max == 7


def test_history_size_zero_turns_history_off() -> None:
    """--history-size 0: no policy at all (rooms behave as without history)."""
    config = _config("--history-size", "0")
    assert config.history is None


def test_environment_sets_history_and_the_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """ROOMCAST_HISTORY_* configure the same; a flag overrides its variable."""
    monkeypatch.setenv("ROOMCAST_HISTORY_SIZE", "10")
    monkeypatch.setenv("ROOMCAST_HISTORY_TTL", "60")
    monkeypatch.setenv("ROOMCAST_RECOVERY_MAX", "50")
    assert _config() == HubConfig(history=HistoryPolicy(History(10, 60.0)), recovery_max=50)
    assert _config("--history-size", "3").history == HistoryPolicy(History(3, 60.0))
    monkeypatch.setenv("ROOMCAST_HISTORY_SIZE", "0")
    assert _config().history is None


@pytest.mark.parametrize(
    ("args", "env", "named", "says"),
    [
        (["--history-size", "-1"], {}, "--history-size", "0 (no history) to 1000000"),
        (["--history-size", "1000001"], {}, "--history-size", "to 1000000"),
        (["--history-size", "ten"], {}, "--history-size", "invalid value"),
        (["--history-size", "1.5"], {}, "--history-size", "invalid value"),
        ([], {"ROOMCAST_HISTORY_SIZE": "-5"}, "ROOMCAST_HISTORY_SIZE", "0 (no history)"),
        (["--history-ttl", "0"], {}, "--history-ttl", "0.001 to 2592000 seconds"),
        (["--history-ttl", "-3"], {}, "--history-ttl", "0.001 to"),
        (["--history-ttl", "nan"], {}, "--history-ttl", "0.001 to"),
        (["--history-ttl", "inf"], {}, "--history-ttl", "0.001 to"),
        (["--history-ttl", "2592001"], {}, "--history-ttl", "(30 days)"),
        (["--history-ttl", "5m"], {}, "--history-ttl", "invalid value"),
        ([], {"ROOMCAST_HISTORY_TTL": "0"}, "ROOMCAST_HISTORY_TTL", "0.001 to"),
        (["--recovery-max", "0"], {}, "--recovery-max", "must be > 0"),
        (["--recovery-max", "lots"], {}, "--recovery-max", "invalid value"),
        ([], {"ROOMCAST_RECOVERY_MAX": "-1"}, "ROOMCAST_RECOVERY_MAX", "must be > 0"),
    ],
)
def test_bad_history_settings_exit_2_naming_the_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    args: list[str], env: dict[str, str], named: str, says: str,
) -> None:
    """--check refuses a bad history value with status 2, the flag or variable, and why."""
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    err = _refused(capsys, *args)
    assert named in err
    assert says in err


def test_check_accepts_history_settings(capsys: pytest.CaptureFixture[str]) -> None:
    """--check with valid history values (and history off) exits 0."""
    for args in (["--history-size", "1000000", "--history-ttl", "2592000"],
                 ["--history-size", "0", "--history-ttl", "0.001", "--recovery-max", "1"]):
        assert cli.main(["serve", "--check", *args]) == 0
        assert "configuration ok" in capsys.readouterr().err


def test_help_names_history_settings_defaults_and_publishers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """serve --help shows each history flag's variable and default, and says Publisher
    processes must use the same policy."""
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for var, default in (("ROOMCAST_HISTORY_SIZE", "100"), ("ROOMCAST_HISTORY_TTL", "300.0"),
                         ("ROOMCAST_RECOVERY_MAX", "1000")):
        assert f"[{var}] (default: {default})" in out
    assert "0 turns history off" in out
    assert "Publisher" in out and "same --history-size and --history-ttl" in out


def test_max_connections_per_user_flag(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """--max-connections-per-user (default 0: off) and its variable reach HubConfig; a
    negative value stops the node naming the flag."""
    monkeypatch.delenv("ROOMCAST_MAX_CONNECTIONS_PER_USER", raising=False)
    assert _config().max_connections_per_user == 0
    assert _config("--max-connections-per-user", "3").max_connections_per_user == 3
    monkeypatch.setenv("ROOMCAST_MAX_CONNECTIONS_PER_USER", "5")
    assert _config().max_connections_per_user == 5
    assert "--max-connections-per-user" in _refused(capsys, "--max-connections-per-user", "-1")


def test_backlog_flag(monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    """--backlog (default 2048) and ROOMCAST_BACKLOG reach the listening socket's
    backlog; 0 stops the node naming the flag."""
    monkeypatch.delenv("ROOMCAST_BACKLOG", raising=False)
    seen: list[int] = []
    monkeypatch.setattr(cli, "configure_logging", lambda *a, **kw: None)
    monkeypatch.setattr(cli.web, "run_app", lambda *a, **kw: seen.append(kw["backlog"]))
    assert cli.main(["serve"]) == 0
    assert cli.main(["serve", "--backlog", "64"]) == 0
    monkeypatch.setenv("ROOMCAST_BACKLOG", "512")
    assert cli.main(["serve"]) == 0
    assert seen == [cli.DEFAULT_BACKLOG, 64, 512] and cli.DEFAULT_BACKLOG == 2048
    assert "--backlog" in _refused(capsys, "--backlog", "0")
