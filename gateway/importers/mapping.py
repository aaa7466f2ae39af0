"""A Gorgias HTTP integration as a gateway `[[integrations]]` entry: pure functions, no I/O.

Gorgias renders `{{ticket...}}` variables into the URL before it calls, so the gateway's `target`
is the part of the URL that never changes: scheme, host and the leading path segments without a
variable. The rest of the path and the query stay in the helpdesk, after `/hooks/{name}`, and the
gateway appends them to the target byte for byte: the endpoint receives what it received before.

Headers without variables are the endpoint's credentials: they move into the gateway config as
`${GORGIAS_<id>_<HEADER>}`, their values into an env file; headers with variables must stay in the
helpdesk, which alone can render them. Variable names carry the Gorgias id, so an integration
imported before is recognised by its `inbound_token = "${GORGIAS_<id>_TOKEN}"`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from gateway.errors import ImportRefused
from gateway.settings import DEFAULT_TOKEN_PARAM

Mode = Literal["relay", "proxy"]
MODES: tuple[Mode, ...] = ("relay", "proxy")
TEMPLATE = "{{"
TOKEN_HEADER = "X-Gateway-Token"
MAX_NAME = 60  # the gateway allows 64; room for a "-NN" suffix


@dataclass(frozen=True)
class Source:
    """One Gorgias HTTP integration, as read from the API or a saved answer of it."""

    id: int
    name: str
    url: str
    method: str
    headers: dict[str, str]
    deactivated: str | None  # when Gorgias switched it off, or None
    managed: bool
    raw: dict[str, Any] = field(repr=False)  # the whole object: the backup, and the PUT's base

    @property
    def label(self) -> str:
        return f'{self.id} "{self.name}"'


@dataclass(frozen=True)
class Skipped:
    source: Source
    reason: str


@dataclass(frozen=True)
class Entry:
    """What one Gorgias integration becomes: the gateway entry and the helpdesk's new URL."""

    source: Source
    name: str
    target: str
    rest: str  # the path after the target and the query ("/{{ticket.id}}?x=1"), variables verbatim
    mode: Mode
    header_vars: dict[str, str]  # header moved into the gateway -> its env variable
    kept_headers: dict[str, str]  # headers with variables: they stay in the helpdesk
    existing: bool = False  # already in the config from an earlier import: nothing new is written

    @property
    def token_var(self) -> str:
        return token_var(self.source.id)

    @property
    def endpoint_takes_token_param(self) -> bool:
        """The endpoint's own query has a `token` parameter, which the gateway would otherwise
        take for its inbound token and cut out."""
        query = urlsplit(self.rest).query
        return DEFAULT_TOKEN_PARAM in (k for k, _ in parse_qsl(query, keep_blank_values=True))

    def new_url(self, gateway_url: str) -> str:
        return f"{gateway_url.rstrip('/')}/hooks/{self.name}{self.rest}"

    def env(self, token: str) -> dict[str, str]:
        """The env file's lines for this entry: the inbound token and the moved headers' values."""
        return {self.token_var: token} | {
            var: self.source.headers[header] for header, var in self.header_vars.items()
        }

    def table(self) -> dict[str, Any]:
        """The `[[integrations]]` entry: no secret in it, only `${VAR}` references."""
        entry: dict[str, Any] = {
            "name": self.name,
            "target": self.target,
            "mode": self.mode,
            "inbound_token": "${" + self.token_var + "}",
        }
        if self.endpoint_takes_token_param:
            entry["inbound_token_param"] = ""  # its `token` goes to the endpoint; ours in the header
        if self.header_vars:
            entry["headers"] = {header: "${" + var + "}" for header, var in self.header_vars.items()}
        return entry

    def helpdesk_update(self, gateway_url: str, token: str, reactivate: bool) -> dict[str, Any]:
        """The body of `PUT /api/integrations/{id}/`: the integration's own `http` with the new URL
        and the headers the helpdesk still sends (its templated ones and the gateway's token)."""
        http = dict(self.source.raw["http"])
        http["url"] = self.new_url(gateway_url)
        http["headers"] = {**self.kept_headers, TOKEN_HEADER: token}
        body: dict[str, Any] = {"http": http}
        if reactivate and self.source.deactivated:
            body["deactivated_datetime"] = None
        return body


def token_var(gorgias_id: int) -> str:
    return f"GORGIAS_{gorgias_id}_TOKEN"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def sources(document: Any) -> list[Source]:
    """The integrations of a saved answer: the paged object, a bare list, or one integration."""
    if isinstance(document, dict) and "data" in document:
        items = document["data"]
        if not isinstance(items, list):
            raise ImportRefused('the document\'s "data" is not a list of integrations')
    elif isinstance(document, list):
        items = document
    elif isinstance(document, dict):
        items = [document]
    else:
        raise ImportRefused("the document is not a Gorgias integration, a list of them or a page of them")
    out = [read_source(item, n) for n, item in enumerate(items)]
    ids = [s.id for s in out]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise ImportRefused(f"the document lists integration {twice[0]} more than once")
    return out


def read_source(item: Any, n: int) -> Source:
    """One integration; anything missing or of the wrong type is named with its place."""
    where = f"integration #{n + 1}"
    if not isinstance(item, dict):
        raise ImportRefused(f"{where} is not an object")
    ident = item.get("id")
    if not isinstance(ident, int) or isinstance(ident, bool):
        raise ImportRefused(f'{where} has no integer "id"')
    where = f"integration {ident}"
    http = item.get("http")
    if not isinstance(http, dict):
        raise ImportRefused(f'{where} has no "http" object (is it an HTTP integration?)')
    url, method = http.get("url"), http.get("method", "POST")
    if not isinstance(url, str) or not url:
        raise ImportRefused(f'{where}: "http.url" is missing')
    if not isinstance(method, str):
        raise ImportRefused(f'{where}: "http.method" is not a string')
    headers = http.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ImportRefused(f'{where}: "http.headers" is not an object of strings')
    deactivated = item.get("deactivated_datetime")
    name = item.get("name")
    return Source(
        id=ident,
        name=name if isinstance(name, str) else "",
        url=url,
        method=method.upper(),
        headers=headers,
        deactivated=deactivated if isinstance(deactivated, str) and deactivated else None,
        managed=item.get("managed") is True,
        raw=item,
    )


def split_url(url: str) -> tuple[str, str]:
    """(target, rest): the longest leading part of the URL without a template variable, cut at a
    `/`, and what follows it (path and query). ValueError, with the reason, when it cannot be."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("its URL is not http(s)://host/...")
    if TEMPLATE in parts.netloc:
        raise ValueError("its host has template variables, so no fixed target exists")
    if parts.fragment:
        raise ValueError("its URL has a fragment (#...), which is never sent")
    segments = parts.path.split("/")
    fixed = 0
    while fixed < len(segments) and TEMPLATE not in segments[fixed]:
        fixed += 1
    target = f"{parts.scheme}://{parts.netloc}" + "/".join(segments[:fixed])
    rest = "/".join(segments[fixed:])
    rest = f"/{rest}" if fixed < len(segments) else ""
    if parts.query:
        rest += f"?{parts.query}"
    return target, rest


def slug(name: str, gorgias_id: int) -> str:
    """A URL-safe gateway name from the Gorgias name ("CRM: Sidebar!" -> "crm-sidebar")."""
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:MAX_NAME].strip("-")
    return text or f"gorgias-{gorgias_id}"


def env_name(text: str) -> str:
    return re.sub(r"[^A-Z0-9]+", "_", text.upper()).strip("_") or "HEADER"


def parse_modes(values: Iterable[str]) -> dict[str, Mode]:
    """`--mode all=relay`, `--mode NAME=proxy` (repeated): the name "all" sets every entry."""
    out: dict[str, Mode] = {}
    for value in values:
        name, sep, mode = value.partition("=")
        if not sep or not name or mode not in MODES:
            raise ImportRefused(f"--mode {value!r}: write NAME=relay, NAME=proxy, all=relay or all=proxy")
        out[name] = "proxy" if mode == "proxy" else "relay"
    return out


def plan(
    items: Iterable[Source],
    existing: Mapping[str, Mapping[str, Any]],
    modes: Mapping[str, Mode],
    gateway_url: str,
) -> tuple[list[Entry], list[Skipped]]:
    """Entries for the integrations that can go behind the gateway, and why the others cannot.

    `existing` is the config's integrations by name, as written (variables unexpanded): one whose
    inbound token is this integration's variable was imported before and is reused as it is; any
    other of the same name is a clash.
    """
    entries: list[Entry] = []
    skipped: list[Skipped] = []
    imported = {str(e.get("inbound_token")): name for name, e in existing.items() if e.get("inbound_token")}
    taken = set(existing)
    hooks = gateway_url.rstrip("/") + "/hooks/"
    for source in items:
        if source.managed:
            skipped.append(Skipped(source, "managed by an app; its owner keeps it up to date"))
            continue
        if source.url.startswith(hooks):
            skipped.append(Skipped(source, "already calls the gateway"))
            continue
        try:
            target, rest = split_url(source.url)
        except ValueError as exc:
            skipped.append(Skipped(source, str(exc)))
            continue
        moved = {h: v for h, v in source.headers.items() if TEMPLATE not in v}
        header_vars: dict[str, str] = {}
        for header in moved:
            var = f"GORGIAS_{source.id}_{env_name(header)}"
            while var in header_vars.values() or var == token_var(source.id):
                var += "_"
            header_vars[header] = var
        kept = {h: v for h, v in source.headers.items() if h not in moved}
        mode: Mode = "proxy" if source.method == "GET" else "relay"
        previous = imported.get("${" + token_var(source.id) + "}")
        if previous is not None:
            if str(existing[previous].get("target", "")).rstrip("/") != target.rstrip("/"):
                raise ImportRefused(
                    f"integration {source.label} was imported as {previous!r} with target "
                    f"{existing[previous].get('target')!r}, but it now calls {target!r}: remove "
                    f"{previous!r} from the config and import again"
                )
            was: Mode = "proxy" if existing[previous].get("mode") == "proxy" else "relay"
            entries.append(Entry(source, previous, target, rest, was, header_vars, kept, existing=True))
            continue
        name = slug(source.name, source.id)
        if name in existing:
            raise ImportRefused(
                f"integration {source.label} would be named {name!r}, which the config already has: "
                "rename one of them (in Gorgias or in the config) and import again"
            )
        unique, n = name, 2
        while unique in taken:
            unique, n = f"{name}-{n}", n + 1
        taken.add(unique)
        entries.append(Entry(source, unique, target, rest, mode, header_vars, kept))
    names = {e.name for e in entries}
    unknown = sorted(set(modes) - names - {"all"})
    if unknown:
        raise ImportRefused(
            f"--mode names {', '.join(unknown)}, which this import does not make "
            f"(it makes: {', '.join(sorted(names)) or 'none'})"
        )
    return [_with_mode(e, modes) for e in entries], skipped


def _with_mode(entry: Entry, modes: Mapping[str, Mode]) -> Entry:
    if entry.existing:  # the config decides; this import writes nothing for it
        return entry
    return replace(entry, mode=modes.get(entry.name) or modes.get("all") or entry.mode)
