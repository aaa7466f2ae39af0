"""`gateway import gorgias`: Gorgias HTTP integrations become gateway entries, and with --apply the
helpdesk is pointed at the gateway (and --revert points it back).

The Gorgias API is tests/fake_gorgias.py (written from its documented shapes); the command runs in
process (CliRunner) except where the gateway itself must answer: the apply check and the end to end
test run the real `gateway serve` and `gateway worker` on the produced config and env file.
"""

from __future__ import annotations

import itertools
import os
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from click.testing import CliRunner, Result
from dotenv import dotenv_values

from gateway.cli import main
from gateway.errors import ImportRefused
from gateway.importers import mapping
from gateway.importers.files import env_text
from gateway.importers.gorgias_api import GorgiasAPI
from gateway.settings import load_config
from tests.conftest import Gateway, free_port
from tests.fake_gorgias import API_KEY, USERNAME, FakeGorgias
from tests.upstream import Upstream

CRM_SECRET = "Bearer sk_live_crm_0123456789"
TASKS_SECRET = "tasks-key-abcdef-4242"
GATEWAY_URL = "https://gw.example.com"
CRM_REST = "?email={{ticket.customer.email}}&fields=name%2Corders"  # the CRM sidebar URL after its target
OPERATOR_CONFIG = """\
# The operator's own comment: it must survive the import.
[gateway]
max_body_bytes = 1048576  # 1 MiB, on purpose

[[integrations]]
name = "billing"  # written by hand
target = "https://billing.example.com/api"
[integrations.retry]
max_attempts = 3

[worker]
concurrency = 10  # kept after the array of integrations
"""


def gorgias_integrations(endpoint: str = "https://crm.example.com") -> list[dict[str, Any]]:
    """Five HTTP integrations as the Gorgias API documents them: a sidebar GET, a deactivated
    action, an app's managed one, a form POST that shares a name, one whose host is templated."""

    def http(url: str, method: str, headers: dict[str, str], **extra: Any) -> dict[str, Any]:
        return {
            "url": url,
            "method": method,
            "headers": headers,
            "request_content_type": "application/json",
            "response_content_type": "application/json",
            "form": {},
            "triggers": {"ticket-created": True, "ticket-updated": False},
            **extra,
        }

    return [
        {
            "id": 101,
            "name": "CRM sidebar",
            "type": "http",
            "managed": False,
            "deactivated_datetime": None,
            "http": http(
                f"{endpoint}/api/customers?email={{{{ticket.customer.email}}}}&fields=name%2Corders",
                "GET",
                {"Authorization": CRM_SECRET, "X-Ticket": "{{ticket.id}}"},
            ),
        },
        {
            "id": 102,
            "name": "Create task",
            "type": "http",
            "managed": False,
            "deactivated_datetime": "2026-11-30T10:00:00.000000",
            "http": http(
                f"{endpoint}/v1/users/{{{{ticket.customer.email}}}}/tasks?src=gorgias",
                "POST",
                {"X-Api-Key": TASKS_SECRET},
                form={"subject": "{{ticket.subject}}"},
                triggers={"ticket_created": True},  # an older document's spelling
            ),
        },
        {
            "id": 103,
            "name": "Shopify",
            "type": "http",
            "managed": True,
            "http": http("https://shop.example.com/hook", "GET", {}),
        },
        {
            "id": 104,
            "name": "CRM sidebar",
            "type": "http",
            "managed": False,
            "http": http(
                f"{endpoint}/forms/submit",
                "POST",
                {},
                request_content_type="application/x-www-form-urlencoded",
            ),
        },
        {
            "id": 105,
            "name": "Per-region",
            "type": "http",
            "managed": False,
            "http": http("https://{{ticket.meta.region}}.example.com/hook", "POST", {}),
        },
    ]


def run(args: list[str], env: dict[str, str] | None = None) -> Result:
    base = {"GATEWAY_URL": GATEWAY_URL, "GORGIAS_USERNAME": USERNAME, "GORGIAS_API_KEY": API_KEY}
    return CliRunner().invoke(main, ["import", "gorgias", *args], env={**base, **(env or {})})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def gorgias() -> Iterator[FakeGorgias]:
    server = FakeGorgias(gorgias_integrations()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "gateway.toml").write_text(OPERATOR_CONFIG)
    return tmp_path


def saved_answer(folder: Path, document: Any) -> Path:
    path = folder / "integrations.json"
    path.write_bytes(orjson.dumps(document))
    return path


def test_import_from_a_saved_page(folder: Path) -> None:
    config = folder / "gateway.toml"
    page = {"data": gorgias_integrations(), "meta": {"next_cursor": None}}
    result = run([str(saved_answer(folder, page)), "--out", str(config)])
    assert result.exit_code == 0, result.output

    text = config.read_text()
    assert text.startswith(OPERATOR_CONFIG.split("[[integrations]]")[0].rstrip("\n"))
    assert "# 1 MiB, on purpose" in text and "# written by hand" in text
    raw = tomllib.loads(text)
    assert raw["gateway"]["env_files"] == ["gorgias.env"]
    entries = {i["name"]: i for i in raw["integrations"]}
    assert entries["crm-sidebar"] == {
        "name": "crm-sidebar",
        "target": "https://crm.example.com/api/customers",
        "mode": "proxy",
        "inbound_token": "${GORGIAS_101_TOKEN}",
        "headers": {"Authorization": "${GORGIAS_101_AUTHORIZATION}"},
    }
    assert entries["create-task"]["target"] == "https://crm.example.com/v1/users"
    assert entries["create-task"]["mode"] == "relay"
    assert entries["crm-sidebar-2"]["target"] == "https://crm.example.com/forms/submit"
    assert "headers" not in entries["crm-sidebar-2"]
    assert set(entries) == {"billing", "crm-sidebar", "create-task", "crm-sidebar-2"}
    assert entries["billing"]["retry"] == {"max_attempts": 3}
    assert raw["worker"] == {"concurrency": 10}
    assert "concurrency = 10  # kept after the array of integrations" in text

    env_file = folder / "gorgias.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    values = dotenv_values(env_file, interpolate=False)
    assert values["GORGIAS_101_AUTHORIZATION"] == CRM_SECRET
    assert values["GORGIAS_102_X_API_KEY"] == TASKS_SECRET
    tokens = [values[f"GORGIAS_{n}_TOKEN"] or "" for n in (101, 102, 104)]
    assert all(len(t) >= 32 for t in tokens) and len(set(tokens)) == 3

    for secret in (CRM_SECRET, TASKS_SECRET, "sk_live_crm_0123456789", *tokens):
        assert secret not in text
        assert secret not in result.output
    out = result.output
    assert (
        f"new URL  {GATEWAY_URL}/hooks/crm-sidebar?email={{{{ticket.customer.email}}}}&fields=name%2Corders"
        in out
    )
    assert f"new URL  {GATEWAY_URL}/hooks/create-task/{{{{ticket.customer.email}}}}/tasks?src=gorgias" in out
    assert "X-Gateway-Token: value of GORGIAS_101_TOKEN" in out
    assert "kept in the helpdesk (templated)  X-Ticket" in out
    assert "deactivated in Gorgias since 2026-11-30T10:00:00.000000" in out
    assert 'skipped: Gorgias 103 "Shopify": managed by an app' in out
    assert 'skipped: Gorgias 105 "Per-region": its host has template variables' in out

    # The produced config passes check-config, which reads the env file it names.
    check = CliRunner().invoke(main, ["check-config", str(config)], env={"GATEWAY_CONFIG": None})
    assert check.exit_code == 0, check.output
    assert "ok, 4 integration(s)" in check.output
    loaded = load_config(config, env={})
    crm = loaded.integration("crm-sidebar")
    assert crm is not None and crm.headers["Authorization"].get_secret_value() == CRM_SECRET


@pytest.mark.parametrize("form", ["page", "list", "one"])
def test_a_saved_answer_in_any_of_its_forms(folder: Path, form: str) -> None:
    items = gorgias_integrations()[:2]
    document: Any = {"page": {"data": items, "meta": {}}, "list": items, "one": items[0]}[form]
    config = folder / "gateway.toml"
    result = run([str(saved_answer(folder, document)), "--out", str(config)])
    assert result.exit_code == 0, result.output
    names = [i["name"] for i in tomllib.loads(config.read_text())["integrations"]]
    assert names == ["billing", "crm-sidebar", "create-task"][: 2 if form == "one" else 3]


def test_import_from_the_account_follows_every_page_through_a_429(folder: Path, gorgias: FakeGorgias) -> None:
    gorgias.throttle = 1
    config = folder / "gateway.toml"
    result = run(["--account", gorgias.url, "--out", str(config), "--json"])
    assert result.exit_code == 0, result.output
    report = orjson.loads(result.output)
    assert [i["gorgias_id"] for i in report["integrations"]] == [101, 102, 104]
    assert {s["gorgias_id"]: s["reason"] for s in report["skipped"]}.keys() == {103, 105}
    lists = [path for method, path in gorgias.requests if method == "GET"]
    assert len(lists) == 4  # the 429, then three pages of two
    assert lists[0] == lists[1]  # the throttled page was asked again
    assert "cursor=" in lists[-1]
    assert gorgias.puts == []  # without --apply nothing is written to the helpdesk
    crm = report["integrations"][0]
    assert crm == {
        "gorgias_id": 101,
        "gorgias_name": "CRM sidebar",
        "name": "crm-sidebar",
        "mode": "proxy",
        "target": "https://crm.example.com/api/customers",
        "old_url": gorgias_integrations()[0]["http"]["url"],
        "new_url": f"{GATEWAY_URL}/hooks/crm-sidebar{CRM_REST}",
        "helpdesk_headers": {"X-Gateway-Token": "${GORGIAS_101_TOKEN}"},
        "kept_headers": ["X-Ticket"],
        "moved_headers": {"Authorization": "${GORGIAS_101_AUTHORIZATION}"},
        "deactivated": None,
        "already_imported": False,
        "applied": False,
        "reactivated": False,
    }
    assert report["integrations"][1]["deactivated"] == "2026-11-30T10:00:00.000000"
    assert report["env_file"] == str(folder / "gorgias.env")
    assert CRM_SECRET not in result.output and TASKS_SECRET not in result.output


def test_retry_after_is_honoured_up_to_a_cap(gorgias: FakeGorgias) -> None:
    waits: list[float] = []
    api = GorgiasAPI(gorgias.url, USERNAME, API_KEY, max_wait_s=5, sleep=waits.append)
    gorgias.throttle, gorgias.retry_after = 1, "3"
    with api:
        assert len(api.integrations()) == 5
        gorgias.throttle, gorgias.retry_after = 1, "120"
        api.integrations()
        gorgias.throttle = 10  # past max_retries: the command ends instead of waiting forever
        with pytest.raises(ImportRefused, match="kept answering 429"):
            api.integrations()
    assert waits[:2] == [3.0, 5.0]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("bad_key", "refused the credentials (401): check GORGIAS_USERNAME and GORGIAS_API_KEY"),
        ("no_key", "set GORGIAS_USERNAME"),
        ("unreachable", "cannot reach http://127.0.0.1:"),
        ("not_json", "is not JSON"),
        ("no_id", 'integration #2 has no integer "id"'),
        ("no_http", 'integration 101 has no "http" object'),
        ("bad_headers", 'integration 101: "http.headers" is not an object of strings'),
        ("twice", "lists integration 101 more than once"),
        ("clash", "would be named 'crm-sidebar', which the config already has"),
        ("env_exists", "gorgias.env exists already"),
        ("bad_mode", "--mode 'crm-sidebar=tunnel'"),
        ("unknown_mode", "--mode names nope, which this import does not make"),
        ("fails_check", "the merged config would not pass check-config"),
        ("apply_from_file", "--apply needs --account"),
        ("reactivate_alone", "--reactivate goes with --apply"),
        ("bad_gateway_url", "GATEWAY_URL 'gw.example.com' is not a base URL"),
        ("no_input", "give a saved answer of GET /api/integrations?type=http (FILE) or --account URL"),
        ("two_inputs", "(FILE) or --account URL, not both"),
    ],
)
def test_refusals_are_one_line_and_change_nothing(
    folder: Path, gorgias: FakeGorgias, setup: str, message: str
) -> None:
    config = folder / "gateway.toml"
    items = gorgias_integrations()
    args = ["--account", gorgias.url, "--out", str(config)]
    env: dict[str, str] = {}
    if setup == "bad_key":
        env["GORGIAS_API_KEY"] = "wrong"
    elif setup == "no_key":
        env["GORGIAS_API_KEY"] = ""
    elif setup == "unreachable":
        args[1] = f"http://127.0.0.1:{free_port()}"
    elif setup == "not_json":
        (folder / "integrations.json").write_text("{not json")
        args[:2] = [str(folder / "integrations.json")]
    elif setup in ("no_id", "no_http", "bad_headers", "twice"):
        if setup == "no_id":
            del items[1]["id"]
        elif setup == "no_http":
            del items[0]["http"]
        elif setup == "bad_headers":
            items[0]["http"]["headers"] = ["Authorization", CRM_SECRET]
        else:
            items.append(items[0])
        args[:2] = [str(saved_answer(folder, items))]
    elif setup == "clash":
        config.write_text(
            OPERATOR_CONFIG + '\n[[integrations]]\nname = "crm-sidebar"\ntarget = "https://x.example.com"\n'
        )
    elif setup == "env_exists":
        (folder / "gorgias.env").write_text("KEEP=me\n")
    elif setup == "bad_mode":
        args += ["--mode", "crm-sidebar=tunnel"]
    elif setup == "unknown_mode":
        args += ["--mode", "nope=relay"]
    elif setup == "fails_check":
        config.write_text(OPERATOR_CONFIG + 'inbound_token = "${UNSET_IN_THIS_TEST}"\n')
    elif setup == "apply_from_file":
        args[:2] = [str(saved_answer(folder, items))]
        args.append("--apply")
    elif setup == "reactivate_alone":
        args.append("--reactivate")
    elif setup == "bad_gateway_url":
        env["GATEWAY_URL"] = "gw.example.com"
    elif setup == "no_input":
        args = args[2:]
    elif setup == "two_inputs":
        args.insert(0, str(saved_answer(folder, items)))
    before = snapshot(folder)

    result = run(args, env)

    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("gateway: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr and CRM_SECRET not in result.stderr
    assert snapshot(folder) == before
    assert gorgias.puts == []


def test_mode_overrides(folder: Path) -> None:
    config = folder / "gateway.toml"
    document = saved_answer(folder, gorgias_integrations())
    result = run(
        [str(document), "--out", str(config), "--mode", "all=relay", "--mode", "crm-sidebar-2=proxy"]
    )
    assert result.exit_code == 0, result.output
    modes = {i["name"]: i.get("mode") for i in tomllib.loads(config.read_text())["integrations"]}
    assert modes == {
        "billing": None,
        "crm-sidebar": "relay",
        "create-task": "relay",
        "crm-sidebar-2": "proxy",
    }


def test_a_new_config_file_and_a_chosen_env_file(tmp_path: Path) -> None:
    config, env_file = tmp_path / "new.toml", tmp_path / "secrets" / "crm.env"
    env_file.parent.mkdir()
    document = saved_answer(tmp_path, gorgias_integrations()[:1])
    result = run([str(document), "--out", str(config), "--env-file", str(env_file)])
    assert result.exit_code == 0, result.output
    assert tomllib.loads(config.read_text())["gateway"]["env_files"] == ["secrets/crm.env"]
    assert load_config(config, env={}).integration("crm-sidebar") is not None


@pytest.mark.parametrize(
    ("url", "target", "rest"),
    [
        (
            "https://a.example.com/api/x?e={{ticket.customer.email}}",
            "https://a.example.com/api/x",
            "?e={{ticket.customer.email}}",
        ),
        ("https://a.example.com/u/{{ticket.id}}/notes/", "https://a.example.com/u", "/{{ticket.id}}/notes/"),
        ("https://a.example.com/u/id-{{ticket.id}}", "https://a.example.com/u", "/id-{{ticket.id}}"),
        ("https://a.example.com/{{ticket.id}}", "https://a.example.com", "/{{ticket.id}}"),
        ("https://a.example.com/hook/", "https://a.example.com/hook/", ""),
        ("http://a.example.com:8080", "http://a.example.com:8080", ""),
    ],
)
def test_target_is_the_longest_fixed_leading_path(url: str, target: str, rest: str) -> None:
    assert mapping.split_url(url) == (target, rest)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://{{ticket.via}}.example.com/x", "host has template variables"),
        ("ftp://a.example.com/x", r"not http\(s\)"),
        ("https://a.example.com/x#top", "fragment"),
    ],
)
def test_urls_that_cannot_go_behind_the_gateway(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        mapping.split_url(url)


def test_an_endpoint_that_takes_a_token_parameter_keeps_it() -> None:
    """The gateway's own token then travels in the header alone (inbound_token_param = "")."""
    crm = gorgias_integrations()[0]
    with_token = {**crm, "http": {**crm["http"], "url": "https://a.example.com/x?token={{ticket.id}}&b=1"}}
    (entry,), _ = mapping.plan(mapping.sources(with_token), {}, {}, GATEWAY_URL)
    assert entry.rest == "?token={{ticket.id}}&b=1"
    assert entry.table()["inbound_token_param"] == ""
    (plain,), _ = mapping.plan(mapping.sources(crm), {}, {}, GATEWAY_URL)
    assert "inbound_token_param" not in plain.table()


def test_names_are_url_safe() -> None:
    assert mapping.slug("CRM: Sidebar! (EU)", 7) == "crm-sidebar-eu"
    assert mapping.slug("???", 7) == "gorgias-7"
    assert len(mapping.slug("x" * 200, 7)) == mapping.MAX_NAME


def test_env_file_values_come_back_byte_for_byte(tmp_path: Path) -> None:
    values = {"A": "it's a \\ back'slash", "B": '$HOME ${X} "q"', "C": "Bearer abc=="}
    path = tmp_path / "x.env"
    path.write_text(env_text(values))
    assert dotenv_values(path, interpolate=False) == values


def render(text: str, encoded: bool) -> str:
    """A URL or header as Gorgias sends it: each variable's value in its place, percent-encoded
    (as Gorgias does in URLs) or as it is (the importer must not depend on which)."""
    email = "ann+1@example.com"
    return text.replace("{{ticket.customer.email}}", quote(email, safe="") if encoded else email).replace(
        "{{ticket.id}}", "7"
    )


def test_apply_end_to_end_and_revert(tmp_path: Path, redis_url: str, upstream: Upstream) -> None:
    """The helpdesk is pointed at the real gateway only once it serves the new names; a rendered
    URL then reaches the original endpoint exactly as the original URL did; revert puts it back."""
    gorgias = FakeGorgias(gorgias_integrations(upstream.url)).start()
    gw = Gateway(tmp_path, redis_url)
    try:
        _apply_end_to_end(tmp_path, gorgias, gw, upstream)
    finally:
        gw.stop()
        gorgias.stop()


def _apply_end_to_end(tmp_path: Path, gorgias: FakeGorgias, gw: Gateway, upstream: Upstream) -> None:
    gw.configure()  # the operator's config: loopback targets allowed, quick workers
    env = {"GATEWAY_URL": gw.url, "GATEWAY_CONFIG": str(gw.config_path)}
    originals = {n: gorgias.get(n) for n in (101, 102, 104)}

    # --apply while the gateway does not serve the names yet: the config is written, Gorgias is not.
    refused = run(["--account", gorgias.url, "--apply"], env)
    assert refused.exit_code == 1
    assert f"cannot reach the gateway at {gw.url}" in refused.stderr
    assert f"this run wrote {gw.config_path} and {tmp_path / 'gorgias.env'}" in refused.stderr
    assert gorgias.puts == [] and not list(tmp_path.glob("gorgias-backup-*"))
    written = gw.config_path.read_text()
    assert "GORGIAS_101_TOKEN" in written

    gw.start()
    result = run(["--account", gorgias.url, "--apply", "--reactivate"], env)
    assert result.exit_code == 0, result.output
    assert gw.config_path.read_text() == written  # already imported: reused, not written twice
    assert "already in the config" in result.output and "updated in Gorgias" in result.output
    env_values = dotenv_values(tmp_path / "gorgias.env", interpolate=False)
    assert {n for n, _ in gorgias.puts} == {101, 102, 104}

    backups = list(tmp_path.glob("gorgias-backup-*.json"))
    assert len(backups) == 1 and stat.S_IMODE(backups[0].stat().st_mode) == 0o600
    saved = orjson.loads(backups[0].read_bytes())
    assert {i["id"]: i for i in saved["integrations"]} == originals

    crm, task, form = gorgias.get(101), gorgias.get(102), gorgias.get(104)
    assert (
        crm["http"]["url"]
        == f"{gw.url}/hooks/crm-sidebar?email={{{{ticket.customer.email}}}}&fields=name%2Corders"
    )
    assert crm["http"]["headers"] == {
        "X-Ticket": "{{ticket.id}}",
        "X-Gateway-Token": env_values["GORGIAS_101_TOKEN"],
    }
    assert crm["http"]["triggers"] == originals[101]["http"]["triggers"]
    assert task["deactivated_datetime"] is None  # --reactivate
    assert task["http"]["form"] == {"subject": "{{ticket.subject}}"}

    # What Gorgias sends, rendered, reaches the endpoint as the original URL's request did.
    cases = [
        (originals[101], crm, b"", "application/json"),
        (originals[102], task, b'{"subject":"Refund"}', "application/json"),
        (
            originals[104],
            form,
            b"subject=Refund&email=ann%2B1%40example.com",
            "application/x-www-form-urlencoded",
        ),
    ]
    for (source, now, body, content_type), encoded in itertools.product(cases, (True, False)):
        count = upstream.count()
        sent = {k: render(v, encoded) for k, v in source["http"]["headers"].items()}
        httpx.request(
            source["http"]["method"],
            render(source["http"]["url"], encoded),
            headers={"content-type": content_type, **sent},
            content=body,
        )
        direct = upstream.wait_for(count + 1)[-1]
        via = {k: render(v, encoded) for k, v in now["http"]["headers"].items()}
        answer = httpx.request(
            now["http"]["method"],
            render(now["http"]["url"], encoded),
            headers={"content-type": content_type, **via},
            content=body,
        )
        assert answer.status_code in (200, 202), answer.text
        relayed = upstream.wait_for(count + 2)[-1]
        assert (relayed.method, relayed.path_qs, relayed.body) == (direct.method, direct.path_qs, direct.body)
        if "{{ticket.customer.email}}" in source["http"]["url"]:
            assert ("ann%2B1%40example.com" if encoded else "ann+1@example.com") in relayed.path_qs
        for header in ("content-type", *(h.lower() for h in source["http"]["headers"])):
            assert relayed.headers.get(header) == direct.headers.get(header), header
        assert "x-gateway-token" not in relayed.headers

    # After the apply, the integrations call the gateway: a new import has nothing to do.
    again = run(["--account", gorgias.url, "--json"], env)
    assert again.exit_code == 0, again.output
    assert orjson.loads(again.output)["integrations"] == []

    reverted = run(["--revert", str(backups[0])], env)
    assert reverted.exit_code == 0, reverted.output
    assert "put back 3 integration(s)" in reverted.output
    for n, original in originals.items():
        assert gorgias.get(n) == original


def test_a_failed_update_names_what_changed_and_the_backup(
    tmp_path: Path, redis_url: str, gorgias: FakeGorgias
) -> None:
    gw = Gateway(tmp_path, redis_url)
    try:
        gw.configure()
        env = {"GATEWAY_URL": gw.url, "GATEWAY_CONFIG": str(gw.config_path)}
        assert run(["--account", gorgias.url], env).exit_code == 0
        gw.start()
        gorgias.fail_put = {102}
        result = run(["--account", gorgias.url, "--apply"], env)
        gorgias.fail_put = set()
        assert result.exit_code == 1
        backup = next(tmp_path.glob("gorgias-backup-*.json"))
        assert 'updating Gorgias integration 102 "Create task" failed' in result.stderr
        assert f"Changed before it: crm-sidebar; `gateway import gorgias --revert {backup}`" in result.stderr
        assert [n for n, _ in gorgias.puts] == [101]
        original = gorgias_integrations()[0]
        assert run(["--revert", str(backup)], env).exit_code == 0
        assert gorgias.get(101) == original
    finally:
        gw.stop()


def test_apply_refuses_a_gateway_that_has_not_loaded_the_names(
    tmp_path: Path, redis_url: str, gorgias: FakeGorgias
) -> None:
    gw = Gateway(tmp_path, redis_url)
    try:
        gw.configure().start()  # started before the import: it does not know the new names
        env = {"GATEWAY_URL": gw.url, "GATEWAY_CONFIG": str(gw.config_path)}
        result = run(["--account", gorgias.url, "--apply"], env)
        assert result.exit_code == 1
        assert "answered 404 to an unauthenticated POST" in result.stderr
        assert "restart it" in result.stderr and "nothing was sent to Gorgias" in result.stderr
        assert gorgias.puts == [] and not list(tmp_path.glob("gorgias-backup-*"))
    finally:
        gw.stop()


def test_revert_refuses_what_is_not_a_backup(tmp_path: Path) -> None:
    path = tmp_path / "backup.json"
    path.write_text('{"something": "else"}')
    result = run(["--revert", str(path)])
    assert result.exit_code == 1
    assert "is not a backup written by `gateway import gorgias --apply`" in result.stderr


def test_env_files_of_the_config_are_read_below_the_environment(tmp_path: Path) -> None:
    (tmp_path / "a.env").write_text("KEY='from-file'\n")
    config = tmp_path / "gw.toml"
    config.write_text(
        '[gateway]\nenv_files = ["a.env"]\n[[integrations]]\nname = "x"\ntarget = "https://x.example.com"\n'
        'inbound_token = "${KEY}"\n'
    )
    token = load_config(config, env={}).integrations[0].inbound_token
    assert token is not None and token.get_secret_value() == "from-file"
    token = load_config(config, env={"KEY": "from-env"}).integrations[0].inbound_token
    assert token is not None and token.get_secret_value() == "from-env"
    os.unlink(tmp_path / "a.env")
    result = CliRunner().invoke(main, ["check-config", str(config)])
    assert result.exit_code == 2
    assert "gateway.env_files[0]" in result.stderr and "file not found" in result.stderr
