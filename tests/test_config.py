"""Config: a bad file names the file, the field and the reason, and no process starts on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.settings import load_config

GOOD = """
[[integrations]]
name = "crm"
target = "https://crm.example.com/api"
"""


def run_gateway(
    *args: str, config: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_CONFIG=str(config), REDIS_URL="redis://127.0.0.1:1/0", **(extra_env or {}))
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], env=env, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        (GOOD.replace('"crm"', '"crm crm"'), "integrations[0].name", "should match pattern"),
        (GOOD.replace("https://crm.example.com/api", "ftp://x"), "integrations[0].target", "URL scheme"),
        (
            GOOD.replace("https://crm.example.com/api", "https://crm.example.com/api#top"),
            "integrations[0].target",
            "cannot have a fragment",
        ),
        (GOOD + "timeout_s = -1\n", "integrations[0].timeout_s", "greater than 0"),
        (GOOD + 'mode = "tunnel"\n', "integrations[0].mode", "Input should be 'relay' or 'proxy'"),
        (GOOD + "[integrations.proxy]\nfresh_ttl_s = 5\n", "integrations[0]", 'mode is not "proxy"'),
        (
            GOOD + 'mode = "proxy"\n[integrations.proxy]\nvary_headers = ["x account"]\n',
            "integrations[0].proxy.vary_headers",
            "not a valid HTTP header name",
        ),
        (
            GOOD + 'mode = "proxy"\n[integrations.proxy]\nmax_response_bytes = 0\n',
            "integrations[0].proxy.max_response_bytes",
            "greater than or equal to 1",
        ),
        (
            GOOD + 'mode = "proxy"\n[integrations.proxy]\nstale_ttl_s = -1\n',
            "integrations[0].proxy.stale_ttl_s",
            "greater than or equal to 0",
        ),
        (GOOD + 'colour = "red"\n', "integrations[0].colour", "Extra inputs are not permitted"),
        (GOOD + 'signing_secrets = ["abc"]\n', "integrations[0].signing_secrets", "whsec_"),
        (GOOD + GOOD, "", "is used twice"),
        ('[gateway]\nallowed_networks = ["10.0.0.300/8"]\n', "gateway.allowed_networks", "not an IP network"),
        (
            GOOD + 'inbound_token = "${NOT_SET_ANYWHERE}"\n',
            "integrations[0].inbound_token",
            "environment variable NOT_SET_ANYWHERE is not set",
        ),
        ("[[integrations]\nname=", "", "not valid TOML"),
        (
            GOOD + "[integrations.retry]\nbackoff_base_s = 10\nbackoff_max_s = 1\n",
            "integrations[0].retry",
            "backoff_max_s must not be smaller",
        ),
    ],
)
def test_invalid_config_names_file_field_and_reason(
    tmp_path: Path, text: str, field: str, reason: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.source == str(path)
    assert caught.value.field == field
    assert reason in caught.value.reason


def test_proxy_mode_defaults(tmp_path: Path) -> None:
    """A proxy answer must come within the helpdesk's own timeout: proxy mode's deadline is 5 s
    unless set; relay keeps 10 s; an explicit value wins in either mode."""
    path = tmp_path / "ok.toml"
    path.write_text(
        GOOD
        + 'mode = "proxy"\n[integrations.proxy]\nvary_headers = ["X-Account", "x-account", "Accept"]\n'
        + GOOD.replace('"crm"', '"actions"')
        + GOOD.replace('"crm"', '"slow"')
        + 'mode = "proxy"\ntimeout_s = 8\n'
    )
    config = load_config(path, env={})
    crm, actions, slow = (config.integration(n) for n in ("crm", "actions", "slow"))
    assert crm is not None and actions is not None and slow is not None
    assert (crm.mode, crm.timeout_s, actions.mode, actions.timeout_s, slow.timeout_s) == (
        "proxy",
        5.0,
        "relay",
        10.0,
        8.0,
    )
    assert crm.proxy.vary_headers == ["accept", "x-account"]
    assert (crm.proxy.stale_ttl_s, crm.proxy.fresh_ttl_s, crm.proxy.queue_on_failure) == (86400, 0, True)
    assert crm.proxy.max_response_bytes == 1048576


def test_env_expansion(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(
        GOOD + 'inbound_token = "${TOK}"\n[integrations.headers]\nAuthorization = "Bearer ${KEY}"\n'
    )
    config = load_config(path, env={"TOK": "abc", "KEY": "k-1"})
    crm = config.integration("crm")
    assert crm is not None and crm.inbound_token is not None
    assert crm.inbound_token.get_secret_value() == "abc"
    assert crm.headers["Authorization"].get_secret_value() == "Bearer k-1"
    assert "k-1" not in repr(config)


def test_a_query_in_the_target_comes_first_then_the_requests(tmp_path: Path) -> None:
    path = tmp_path / "q.toml"
    path.write_text(GOOD.replace("https://crm.example.com/api", "https://crm.example.com/api?key=1&v=2"))
    crm = load_config(path, env={}).integration("crm")
    assert crm is not None
    assert crm.upstream_url("", "") == "https://crm.example.com/api?key=1&v=2"
    assert (
        crm.upstream_url("t/1", "email=a%2Bb%40x.com")
        == "https://crm.example.com/api/t/1?key=1&v=2&email=a%2Bb%40x.com"
    )
    (tmp_path / "p.toml").write_text(GOOD)
    crm = load_config(tmp_path / "p.toml", env={}).integration("crm")
    assert crm is not None and crm.upstream_url("t/1", "x=1") == "https://crm.example.com/api/t/1?x=1"


def test_shipped_example_config_is_valid() -> None:
    config = load_config(Path(__file__).parent.parent / "config" / "gateway.toml", env={})
    assert [(i.name, i.mode) for i in config.integrations] == [("demo", "relay"), ("demo-sidebar", "proxy")]


@pytest.mark.parametrize("command", [["check-config"], ["serve", "--port", "0"], ["worker"]])
def test_commands_refuse_bad_config_without_traceback(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(GOOD + 'timeout_s = "soon"\n')
    done = run_gateway(*command, config=path)
    assert done.returncode == 2
    assert f"{path}: integrations[0].timeout_s: Input should be a valid number" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_serve_refuses_to_start_without_admin_token(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    done = run_gateway("serve", "--port", "0", config=path)
    assert done.returncode == 2
    assert "GATEWAY_ADMIN_TOKEN is not set" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_config_accepts_good_file_and_reports_missing_one(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    ok = run_gateway("check-config", str(path), config=tmp_path / "unused.toml")
    assert ok.returncode == 0, ok.stderr
    assert "1 integration" in ok.stdout
    missing = run_gateway("check-config", str(tmp_path / "nope.toml"), config=path)
    assert missing.returncode == 2
    assert "nope.toml: file not found" in missing.stderr
