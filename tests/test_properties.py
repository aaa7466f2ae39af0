"""Properties (hypothesis) of what a client controls at ingress (the path after /hooks/{name}, the
query, the headers, the idempotency key) and of the config loader: whatever arrives, the answer is
one of the gateway's own refusals or a request that stays inside its integration's target, with the
helpdesk's bytes kept; whatever the config file holds, the loader answers a Config or a ConfigError
that names the file.

In process: these call `Ingress._receive` (every check a request passes before it is stored) and
`parse_config` directly, so hypothesis can try thousands of inputs in seconds. The real processes
prove the same paths end to end in test_ingress.py and test_config.py."""

from __future__ import annotations

import asyncio
import posixpath
from typing import Any, cast
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway.errors import BadRequest, ConfigError, HTTPError
from gateway.events import StoredRequest
from gateway.ingress import DROPPED_HEADERS, MAX_IDEMPOTENCY_KEY, Answered, Ingress, _idempotency_key
from gateway.sealing import CREDENTIAL_HEADERS, PREFIX, AtRest, Sealer, open_headers
from gateway.settings import Config, Integration, parse_config

TARGET = "http://127.0.0.1:9/api/v1"
TOKEN = "inbound-token-1"
CONFIG_HEAD = '[gateway]\nallowed_networks = ["127.0.0.0/8"]\n'
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _toml(value: Any) -> str:
    """A TOML value, inline (tables as inline tables): enough to write any document drawn below."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        out = "".join(
            "\\" + c if c in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 32 or ord(c) == 127 else c
            for c in value
        )
        return f'"{out}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{_toml(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"


def _config(**fields: Any) -> Config:
    extra = "".join(f"{k} = {_toml(v)}\n" for k, v in fields.items())
    text = CONFIG_HEAD + f'[[integrations]]\nname = "crm"\ntarget = "{TARGET}"\n{extra}'
    return parse_config(text, "test.toml", {})


PLAIN = _config()
WITH_TOKEN = _config(inbound_token=TOKEN)
REPLACING = _config(headers={"Authorization": "Bearer configured"})


def _ingress(config: Config, at_rest: AtRest | None = None) -> Ingress:
    # _receive checks and shapes a request; it never reaches the batcher or the proxy.
    return Ingress(
        config, cast(Any, None), cast(Any, None), lambda reason: None, at_rest or AtRest(None, frozenset())
    )


def _receive(
    config: Config,
    rest: bytes = b"",
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    method: str = "POST",
    body: bytes = b"{}",
) -> tuple[Integration, StoredRequest, str]:
    raw_path = b"/hooks/crm" + (b"/" + rest if rest else b"")
    scope = {
        "type": "http",
        "method": method,
        "path": unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path,
        "query_string": query,
        "headers": headers or [],
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return asyncio.run(_ingress(config)._receive(scope, receive))


# --- the path after /hooks/{name} -------------------------------------------------------------

SEGMENT_PARTS = [
    "a",
    "b",
    "v2",
    ".",
    "..",
    "%2e",
    "%2E",
    "%2f",
    "%5c",
    "\\",
    "%252e",
    "~",
    "x.y",
    "%41",
    "@",
    ":",
]
segments = st.lists(st.sampled_from(SEGMENT_PARTS), min_size=1, max_size=3).map("".join)
rests = st.lists(segments, max_size=6).map("/".join)


@FAST
@given(rests)
def test_a_path_never_leaves_the_target(rest: str) -> None:
    """Refused with 400, or sent below the target's path however the endpoint resolves it: the
    URL library removing dot segments, or the endpoint decoding percent-escapes first."""
    try:
        _, request, _ = _receive(PLAIN, rest.encode())
    except BadRequest:
        return
    base = URL(TARGET).path
    sent = URL(request.url, encoded=True)
    assert sent.host == "127.0.0.1" and sent.port == 9
    for path in (sent.path, unquote(sent.raw_path).replace("\\", "/")):
        resolved = posixpath.normpath(path) if path else "/"
        assert resolved == base or resolved.startswith(base + "/"), (rest, request.url)


@FAST
@given(rests)
def test_the_url_stored_is_the_target_and_the_path_as_sent(rest: str) -> None:
    try:
        _, request, _ = _receive(PLAIN, rest.encode())
    except BadRequest:
        return
    assert request.url == (TARGET + "/" + rest if rest else TARGET)


# --- the query string -------------------------------------------------------------------------

# Parts a helpdesk may send: encoded and raw bytes, `;`, bare flags, empty parts, token look-alikes.
query_parts = st.one_of(
    st.sampled_from(["a=1", "flag", "", "x=%FF", "q=a;b", "token2=z", "tok%65n=", "e=ann%2B1%40example.com"]),
    st.text(st.characters(codec="ascii", exclude_characters="&#"), max_size=12),
)


@FAST
@given(st.lists(query_parts, max_size=6), st.integers(0, 6), st.sampled_from([TOKEN, "tok%65n", "token"]))
def test_the_query_goes_on_byte_for_byte_less_the_token(parts: list[str], at: int, spelling: str) -> None:
    assume(not any(p.split("=")[0] in ("token", "tok%65n") for p in parts))
    name = "tok%65n" if spelling == "tok%65n" else "token"
    with_token = [*parts[:at], f"{name}={TOKEN}", *parts[at:]]
    _, request, _ = _receive(WITH_TOKEN, b"r", "&".join(with_token).encode())
    expected = "&".join(parts)
    assert request.url == TARGET + "/r" + (f"?{expected}" if expected else "")


@FAST
@given(st.lists(query_parts, max_size=6))
def test_the_query_is_untouched_without_a_token(parts: list[str]) -> None:
    query = "&".join(parts)
    _, request, _ = _receive(PLAIN, b"r", query.encode())
    assert request.url == TARGET + "/r" + (f"?{query}" if query else "")


@FAST
@given(st.lists(query_parts, max_size=4), st.text(st.characters(codec="ascii"), max_size=20))
def test_a_wrong_token_is_refused(parts: list[str], wrong: str) -> None:
    assume(wrong != TOKEN)
    header = [(b"x-gateway-token", wrong.encode())]
    with pytest.raises(HTTPError) as refused:
        _receive(WITH_TOKEN, b"r", "&".join(parts).encode(), header)
    assert refused.value.status_code == 401


def test_the_token_parameter_can_be_renamed_or_turned_off() -> None:
    """For an endpoint that takes a `token` parameter itself: inbound_token_param names another,
    or "" leaves the query alone and takes the header only."""
    off = _config(inbound_token=TOKEN, inbound_token_param="")
    header = [(b"x-gateway-token", TOKEN.encode())]
    _, request, _ = _receive(off, b"r", b"token=abc&b=1", header)
    assert request.url == TARGET + "/r?token=abc&b=1"
    with pytest.raises(HTTPError) as refused:
        _receive(off, b"r", f"token={TOKEN}".encode())
    assert refused.value.status_code == 401 and b"parameter is off" in refused.value.body
    renamed = _config(inbound_token=TOKEN, inbound_token_param="gw_token")
    _, request, _ = _receive(renamed, b"r", f"token=abc&gw_token={TOKEN}".encode())
    assert request.url == TARGET + "/r?token=abc"
    with pytest.raises(ConfigError, match="inbound_token_param"):
        _config(inbound_token=TOKEN, inbound_token_param="a&b")


# --- headers ----------------------------------------------------------------------------------

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
header_names = st.one_of(
    st.text(st.sampled_from(TCHAR), min_size=1, max_size=12),
    st.sampled_from([n.decode() for n in DROPPED_HEADERS] + sorted(CREDENTIAL_HEADERS) + ["x-custom"]),
)
# Any byte a header value may carry (RFC 9110: VCHAR, obs-text, space and tab), UTF-8 or not.
header_values = st.one_of(
    st.binary(max_size=24).map(lambda b: bytes(c for c in b if c == 9 or (c >= 32 and c != 127))),
    st.text(max_size=12).map(
        lambda t: "".join(c for c in t if c == "\t" or (c >= " " and c != "\x7f")).encode()
    ),
)
headers_st = st.lists(st.tuples(header_names.map(str.encode), header_values), max_size=12)


def _as_sent(value: str) -> bytes:
    """The bytes the HTTP client writes for a stored value (it encodes UTF-8)."""
    return value.encode("utf-8")


@FAST
@given(headers_st)
def test_headers_keep_their_order_and_their_bytes(headers: list[tuple[bytes, bytes]]) -> None:
    assume(not any(k == b"connection" for k, _ in headers))
    try:
        _, request, _ = _receive(PLAIN, b"r", headers=headers)
    except HTTPError as refused:  # a content-length that is not a number is left to the server
        assert refused.status_code < 500
        return
    expected = [(k, v) for k, v in headers if k not in DROPPED_HEADERS]
    assert [k.encode() for k, _ in request.headers] == [k for k, _ in expected]
    for (_, kept), (_, raw) in zip(request.headers, expected, strict=True):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:  # kept as Latin-1: the stored text holds every byte
            assert kept.encode("latin-1") == raw
        else:
            assert _as_sent(kept) == raw


@FAST
@given(headers_st, st.lists(header_names, min_size=1, max_size=3))
def test_headers_named_in_connection_are_not_relayed(
    headers: list[tuple[bytes, bytes]], listed: list[str]
) -> None:
    connection = (b"connection", ", ".join(listed).encode())
    _, request, _ = _receive(PLAIN, b"r", headers=[*headers, connection])
    names = {k for k, _ in request.headers}
    assert not names & {n.strip().lower() for n in listed}
    assert not names & {n.decode() for n in DROPPED_HEADERS}


@FAST
@given(headers_st, header_values)
def test_a_header_a_configured_one_replaces_is_not_stored(
    headers: list[tuple[bytes, bytes]], value: bytes
) -> None:
    _, request, _ = _receive(REPLACING, b"r", headers=[*headers, (b"authorization", value)])
    assert "authorization" not in {k for k, _ in request.headers}


SEALER = Sealer([b"k" * 32])


@FAST
@given(headers_st, st.text(min_size=4, max_size=40).filter(lambda s: s.strip() == s and "\n" not in s))
def test_credential_headers_are_sealed_at_rest_and_open_unchanged(
    headers: list[tuple[bytes, bytes]], secret: str
) -> None:
    assume(not any(k == b"connection" for k, _ in headers))
    sent = [*headers, (b"x-api-key", secret.encode())]
    _, request, _ = _receive(PLAIN, b"r", headers=sent)
    at_rest = AtRest(SEALER, frozenset(CREDENTIAL_HEADERS))
    stored = StoredRequest.unpack(at_rest.pack(request))
    for name, value in stored.headers:
        if name in CREDENTIAL_HEADERS:
            assert value.startswith(PREFIX)
    assert open_headers(SEALER, stored.headers) == request.headers


# --- every input: one of the gateway's own answers --------------------------------------------

methods = st.one_of(
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"]),
    st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), min_size=1, max_size=8),
)


@FAST
@given(
    methods,
    st.binary(max_size=40),
    st.binary(max_size=40),
    headers_st,
    st.sampled_from([PLAIN, WITH_TOKEN, REPLACING]),
)
def test_any_request_is_taken_or_refused_with_a_client_error(
    method: str, rest: bytes, query: bytes, headers: list[tuple[bytes, bytes]], config: Config
) -> None:
    try:
        integration, request, _key = _receive(config, rest.lstrip(b"/"), query, headers, method)
    except Answered as answered:
        assert method == "OPTIONS" and answered.status == 204
        return
    except HTTPError as refused:
        assert 400 <= refused.status_code < 500, refused.body
        return
    assert integration.name == "crm" and request.method == method
    assert request.url.startswith(TARGET)


# Keys that share a long start (a helpdesk's prefix plus an id) are the ones cutting would merge.
# Header bytes arrive decoded as Latin-1.
latin1 = st.characters(codec="latin-1")
prefixes = st.one_of(
    st.text(latin1, max_size=20),
    st.text(latin1, min_size=MAX_IDEMPOTENCY_KEY - 10, max_size=MAX_IDEMPOTENCY_KEY + 50),
)


@FAST
@given(prefixes, st.text(latin1, max_size=30), st.text(latin1, max_size=30))
def test_idempotency_keys_are_kept_whole_and_short(prefix: str, a: str, b: str) -> None:
    assume(a != b)
    ka, kb = _idempotency_key(prefix + a), _idempotency_key(prefix + b)
    assert ka != kb
    assert len(ka) <= max(MAX_IDEMPOTENCY_KEY, len("sha256:") + 64)


# --- the config loader ------------------------------------------------------------------------


scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(
        ["http://127.0.0.1:8001/x", "https://crm.example/api?k=1", "ftp://x", "${CRM_KEY}", "${NOPE}"]
    ),
)
INTEGRATION_FIELDS = [
    "name",
    "target",
    "mode",
    "timeout_s",
    "failure_threshold",
    "probe_cooldown_s",
    "inbound_token",
    "headers",
    "retry",
    "proxy",
    "max_in_flight",
    "rate_limit_per_s",
    "rate_limit_burst",
    "ordered",
    "signing_secrets",
    "inbound_signature",
    "unknown_field",
]
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
integrations = st.fixed_dictionaries(
    {"name": st.sampled_from(["crm", "a.b-c_1", "", "-bad", "x" * 65]) | st.text(max_size=10)},
    optional={field: values for field in INTEGRATION_FIELDS[1:]}
    | {"target": st.sampled_from(["http://127.0.0.1:8001/x", "https://crm.example/api?k=1", "http://h/#f"])},
)
sections = st.fixed_dictionaries(
    {},
    optional={
        "gateway": st.dictionaries(
            st.sampled_from(
                ["max_body_bytes", "allowed_networks", "store_credentials", "read_timeout_s", "x"]
            ),
            values,
            max_size=3,
        ),
        "worker": st.dictionaries(st.sampled_from(["concurrency", "poll_delay_s", "y"]), values, max_size=2),
        "integrations": st.lists(integrations, max_size=3),
        "alerts": st.lists(st.dictionaries(st.sampled_from(["kind", "url"]), values, max_size=2), max_size=2),
    },
)
ENV = {"CRM_KEY": "s3cret-value"}


@settings(max_examples=300, deadline=None)
@given(sections)
# Found by this test: a mode that is not a string crashed the loader; `true` or `1` was taken for
# the network 0.0.0.1/32.
@example({"integrations": [{"name": "crm", "target": "http://127.0.0.1:8001/x", "mode": []}]})
@example({"gateway": {"allowed_networks": [True]}})
@example({"gateway": {"allowed_networks": [1]}})
def test_any_config_document_loads_or_is_refused_by_name(doc: dict[str, Any]) -> None:
    text = "\n".join(f"{k} = {_toml(v)}" for k, v in doc.items())
    try:
        config = parse_config(text, "fuzz.toml", ENV)
    except ConfigError as refused:
        assert str(refused).startswith("fuzz.toml"), str(refused)
        return
    assert [i.name for i in config.integrations] == [i["name"] for i in doc.get("integrations", [])]
    for integration in config.integrations:
        assert "${" not in str(integration.target)
        assert integration.target.fragment is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_loads_or_is_refused_by_name(text: str) -> None:
    try:
        parse_config(text, "fuzz.toml", ENV)
    except ConfigError as refused:
        assert str(refused).startswith("fuzz.toml")


@FAST
@given(
    st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s),
    st.sampled_from(["inbound_token", "header"]),
)
def test_a_variable_is_replaced_by_its_value_exactly(value: str, where: str) -> None:
    field = (
        'inbound_token = "${CRM_KEY}"' if where == "inbound_token" else 'headers = {"X-Key" = "${CRM_KEY}"}'
    )
    text = CONFIG_HEAD + f'[[integrations]]\nname = "crm"\ntarget = "{TARGET}"\n{field}\n'
    integration = parse_config(text, "t.toml", {"CRM_KEY": value}).integrations[0]
    secret = integration.inbound_token if where == "inbound_token" else integration.headers["X-Key"]
    assert secret is not None and secret.get_secret_value() == value


@FAST
@given(
    st.integers(0, 2),
    st.sampled_from(["timeout_s = -1", "mode = 'mirror'", "max_in_flight = 0", "bogus = 1"]),
)
def test_an_error_names_the_integration_and_the_field(index: int, bad: str) -> None:
    blocks = [f'[[integrations]]\nname = "i{n}"\ntarget = "{TARGET}"\n' for n in range(3)]
    blocks[index] += bad + "\n"
    with pytest.raises(ConfigError) as refused:
        parse_config(CONFIG_HEAD + "".join(blocks), "t.toml", {})
    field = bad.split(" ")[0]
    assert f"integrations[{index}].{field}" in str(refused.value)
