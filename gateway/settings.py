"""Settings: the process environment plus one TOML config file, read and validated once.

The config is validated by pydantic; any error is raised as a `ConfigError` that names the file,
the field and the reason. `${NAME}` inside a string value is replaced by the environment variable
NAME; a variable that is not set is an error, so a secret never silently becomes empty.
`${NAME:-default}` takes the default when NAME is unset or empty (the demo's port, say).
`[gateway] env_files` names files of `NAME=value` lines (read with python-dotenv, relative to the
config's folder) whose variables count as set too, below the process environment: `gateway import
gorgias` writes the helpdesk's credentials into one, so they stay out of the TOML.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, quote_plus, unquote

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError
from gateway.sealing import CREDENTIAL_HEADERS, Sealer
from gateway.sealing import ENV as SECRET_KEY_ENV

DEFAULT_CONFIG_PATH = "config/gateway.toml"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_URL = "http://127.0.0.1:8000"  # where the API listens, and the operator commands look
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
REDACTED = "[redacted]"
DEFAULT_TOKEN_PARAM = "token"  # the query parameter that may carry an integration's inbound token
MIN_SECRET = 4  # shorter values are not redacted: they would blank out ordinary text
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryPolicy(_Model):
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 12
    backoff_base_s: Annotated[float, Field(gt=0, le=86400)] = 1.0
    backoff_max_s: Annotated[float, Field(gt=0, le=7 * 86400)] = 3600.0
    max_age_s: Annotated[float, Field(gt=0, le=30 * 86400)] = 86400.0

    @model_validator(mode="after")
    def _max_not_below_base(self) -> RetryPolicy:
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("backoff_max_s must not be smaller than backoff_base_s")
        return self


HEADER_NAME = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"


def _header_names(names: Iterable[str | None]) -> None:
    """Raises ValueError (pydantic's field error) at the first name that is not an HTTP token."""
    for name in names:
        if name is not None and not re.fullmatch(HEADER_NAME, name):
            raise ValueError(f"{name!r} is not a valid HTTP header name")


# Attempts of one integration in flight at once, across all workers, unless set: a hanging endpoint
# then holds at most this many of the workers' slots (a worker has `concurrency`, 100 by default),
# and one endpoint alone still gets the throughput measured in benchmarks/delivery.py.
DEFAULT_MAX_IN_FLIGHT = 32
DEFAULT_TIMEOUT_S = {"relay": 10.0, "proxy": 5.0}


class ProxyPolicy(_Model):
    """How a proxy integration answers: the last good answer, fresh hits, queued writes, limits."""

    stale_ttl_s: Annotated[int, Field(ge=0, le=30 * 86400)] = 86400
    fresh_ttl_s: Annotated[int, Field(ge=0, le=30 * 86400)] = 0
    vary_headers: list[str] = []
    queue_on_failure: bool = True
    max_response_bytes: Annotated[int, Field(ge=1, le=64 * 1024 * 1024)] = 1024 * 1024
    max_cache_bytes: Annotated[int, Field(ge=0, le=16 * 1024 * 1024 * 1024)] = 64 * 1024 * 1024

    @field_validator("vary_headers")
    @classmethod
    def _vary_names(cls, names: list[str]) -> list[str]:
        _header_names(names)
        return sorted({name.lower() for name in names})

    @property
    def keep_ms(self) -> int:
        """How long a copy is kept: long enough for both of its uses."""
        return max(self.stale_ttl_s, self.fresh_ttl_s) * 1000


class InboundSignature(_Model):
    """`[integrations.inbound_signature]`: the helpdesk signs its requests; one that does not
    verify is answered 401 and stored nowhere."""

    scheme: Literal["standard-webhooks", "hmac"]
    secrets: Annotated[list[SecretStr], Field(min_length=1)]  # any of them verifies (rotation)
    tolerance_s: Annotated[float, Field(gt=0, le=86400)] = 300.0  # for the signed timestamp
    # hmac only: where the signature is, how it is made and written, and what it covers.
    header: str | None = None
    algorithm: Literal["sha1", "sha256", "sha512"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = ""  # before the signature in its header, e.g. "sha256="
    signed: Literal["body", "timestamp+body"] = "body"
    timestamp_header: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> InboundSignature:
        from gateway.signing import decode_secret

        if self.scheme == "standard-webhooks":
            extra = [f for f in ("header", "timestamp_header") if getattr(self, f) is not None]
            if extra or self.prefix or self.signed != "body":
                raise ValueError(
                    "standard-webhooks takes only secrets and tolerance_s (the headers are webhook-*)"
                )
            for secret in self.secrets:
                decode_secret(secret.get_secret_value())
            return self
        if self.header is None:
            raise ValueError('scheme "hmac" needs header (the one that carries the signature)')
        if (self.signed == "timestamp+body") != (self.timestamp_header is not None):
            raise ValueError('signed = "timestamp+body" and timestamp_header go together')
        _header_names((self.header, self.timestamp_header))
        return self

    @cached_property
    def _keys(self) -> list[bytes]:
        from gateway.signing import decode_secret

        if self.scheme == "standard-webhooks":
            return [decode_secret(s.get_secret_value()) for s in self.secrets]
        return [s.get_secret_value().encode() for s in self.secrets]

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Raises signing.BadSignature unless the request is signed as configured."""
        from gateway import signing

        if self.scheme == "standard-webhooks":
            signing.verify_standard(self._keys, headers, body, self.tolerance_s)
            return
        assert self.header is not None
        signing.verify_hmac(
            self._keys,
            headers,
            body,
            header=self.header,
            algorithm=self.algorithm,
            encoding=self.encoding,
            prefix=self.prefix,
            timestamp_header=self.timestamp_header,
            tolerance_s=self.tolerance_s,
        )


class Integration(_Model):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    target: AnyHttpUrl
    mode: Literal["relay", "proxy"] = "relay"
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0  # 5 in proxy mode
    failure_threshold: Annotated[int, Field(ge=1)] = 100
    probe: bool = True  # while paused, send one held event after each cool-down; success resumes
    probe_cooldown_s: Annotated[float, Field(gt=0, le=86400)] = 30.0
    probe_cooldown_max_s: Annotated[float, Field(gt=0, le=7 * 86400)] = 900.0
    drain_rate_per_s: Annotated[float, Field(gt=0, le=100000)] = 100.0
    inbound_token: SecretStr | None = None
    # The query parameter that may carry the inbound token instead of X-Gateway-Token (it is cut
    # out before the request goes on); "" for the header alone, when the endpoint takes a
    # parameter of that name itself.
    inbound_token_param: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.~-]{0,64}$")] = DEFAULT_TOKEN_PARAM
    inbound_signature: InboundSignature | None = None
    signing_secrets: list[SecretStr] = []
    headers: dict[str, SecretStr] = {}
    retry: RetryPolicy = RetryPolicy()
    proxy: ProxyPolicy = ProxyPolicy()
    # Scheduling, enforced where attempts are claimed (in Redis, across all workers).
    max_in_flight: Annotated[int, Field(ge=1, le=100000)] = DEFAULT_MAX_IN_FLIGHT
    rate_limit_per_s: Annotated[float, Field(gt=0, le=100000)] | None = None
    rate_limit_burst: Annotated[int, Field(ge=1, le=100000)] | None = None
    ordered: bool = False  # one attempt at a time, in arrival order
    # OPTIONS (a browser's CORS preflight, mostly) is answered 204 and stored nowhere, unless this
    forward_options: bool = False
    # Values that `${VAR}` put into the target's query: secrets, redacted wherever the URL is shown.
    _url_secrets: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="before")
    @classmethod
    def _mode_defaults(cls, data: Any) -> Any:
        """The deadline's default depends on the mode: a proxy answer must come well within the
        helpdesk's own timeout. `[integrations.proxy]` only means something in proxy mode."""
        if not isinstance(data, dict):
            return data
        mode = data.get("mode", "relay")
        if "proxy" in data and mode != "proxy":
            raise ValueError('[integrations.proxy] is set but mode is not "proxy"')
        # Only a known mode sets a default; any other value is left for the field to refuse.
        if "timeout_s" not in data and isinstance(mode, str) and mode in DEFAULT_TIMEOUT_S:
            data = {**data, "timeout_s": DEFAULT_TIMEOUT_S[mode]}
        return data

    @model_validator(mode="after")
    def _cooldowns(self) -> Integration:
        if self.probe_cooldown_max_s < self.probe_cooldown_s:
            raise ValueError("probe_cooldown_max_s must not be smaller than probe_cooldown_s")
        if self.rate_limit_burst is not None and self.rate_limit_per_s is None:
            raise ValueError("rate_limit_burst needs rate_limit_per_s")
        return self

    @property
    def burst(self) -> int:
        """Rate tokens available at once: `rate_limit_burst`, else one second's worth (at least 1)."""
        if self.rate_limit_burst is not None:
            return self.rate_limit_burst
        return max(1, math.ceil(self.rate_limit_per_s or 1))

    @property
    def slots(self) -> int:
        """Attempts it may have in flight at once: one when ordered."""
        return 1 if self.ordered else self.max_in_flight

    @property
    def internal(self) -> bool:
        """An alert sink made from [[alerts]]: never paused, never alerted about."""
        return self.name.startswith("_")

    @field_validator("signing_secrets")
    @classmethod
    def _whsec(cls, secrets: list[SecretStr]) -> list[SecretStr]:
        from gateway.signing import decode_secret

        for secret in secrets:
            decode_secret(secret.get_secret_value())
        return secrets

    @field_validator("headers")
    @classmethod
    def _header_names(cls, headers: dict[str, SecretStr]) -> dict[str, SecretStr]:
        _header_names(headers)
        return headers

    @cached_property
    def configured_header_names(self) -> frozenset[str]:
        """Lower-case names of the configured headers: a helpdesk header of the same name is
        replaced when sent, so it is not stored either."""
        return frozenset(name.lower() for name in self.headers)

    @cached_property
    def _secrets(self) -> re.Pattern[str] | None:
        """Every configured secret value (and its percent-encoded forms) as one pattern."""
        values = {v.get_secret_value() for v in [*self.headers.values(), *self.signing_secrets]}
        for value in list(values):  # "Bearer abc", "Basic abc": the credential alone, echoed
            values.add(value.rsplit(" ", 1)[-1])
        if self.inbound_token is not None:
            values.add(self.inbound_token.get_secret_value())
        if self.inbound_signature is not None:
            values.update(s.get_secret_value() for s in self.inbound_signature.secrets)
        if self.target.password:
            values.add(unquote(self.target.password))
        values.update(self._url_secrets)
        forms = {
            form for v in values if len(v) >= MIN_SECRET for form in (v, quote(v, safe=""), quote_plus(v))
        }
        if not forms:
            return None
        return re.compile("|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)))

    def redact(self, text: str) -> str:
        """`text` with every configured secret value in it replaced by [redacted]: for attempt
        bodies that echo a credential, and for URLs shown by the admin API and the CLI."""
        pattern = self._secrets
        return text if pattern is None else pattern.sub(REDACTED, text)

    def upstream_url(self, rest: str, query: str) -> str:
        """`target` + `/{rest}` + `?{query}`, as the contract promises; a query in the target comes
        first, then the request's (`target?key=1` and `?email=a` give `?key=1&email=a`)."""
        base, stem, fixed = self._target_parts
        url = stem + rest if rest else base
        query = f"{fixed}&{query}" if fixed and query else fixed or query
        return f"{url}?{query}" if query else url

    @cached_property
    def _target_parts(self) -> tuple[str, str, str]:
        """The target without its query, the same ending in one "/", and its query."""
        base, _, fixed = str(self.target).partition("?")
        return base, base.rstrip("/") + "/", fixed

    @field_validator("target")
    @classmethod
    def _no_fragment(cls, target: AnyHttpUrl) -> AnyHttpUrl:
        if target.fragment is not None:
            raise ValueError("a target cannot have a fragment (#...): it is never sent to the endpoint")
        return target


class Alert(_Model):
    kind: Literal["webhook", "slack"] = "webhook"
    url: AnyHttpUrl


class GatewaySection(_Model):
    # Files of NAME=value lines for ${NAME} (read before the rest is validated; see parse_config).
    env_files: list[str] = []
    # "sealed": credential headers are encrypted at rest under GATEWAY_SECRET_KEY, and `serve` and
    # `worker` refuse to start without it; "plain" keeps them in clear, on purpose.
    store_credentials: Literal["sealed", "plain"] = "sealed"
    credential_headers: list[str] = []  # sealed and never shown, beside CREDENTIAL_HEADERS
    max_body_bytes: Annotated[int, Field(ge=1, le=64 * 1024 * 1024)] = 1024 * 1024
    allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    idempotency_ttl_s: Annotated[int, Field(ge=1)] = 86400
    store_timeout_s: Annotated[float, Field(gt=0, le=30)] = 1.0
    # On SIGTERM the API stops accepting connections and gives its open requests this long to end.
    shutdown_grace_s: Annotated[float, Field(ge=0, le=3600)] = 10.0
    # What one client may cost (gateway.limits): request line and headers, in bytes and fields
    # (431 past them); the time a request has to arrive whole (408); connections kept at most.
    max_header_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 32 * 1024
    max_header_count: Annotated[int, Field(ge=8, le=1000)] = 100
    read_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 4096

    @field_validator("credential_headers")
    @classmethod
    def _credential_names(cls, names: list[str]) -> list[str]:
        _header_names(names)
        return [name.lower() for name in names]

    @cached_property
    def credential_names(self) -> frozenset[str]:
        """Header names (lower case) whose values are sealed at rest and never shown."""
        return CREDENTIAL_HEADERS | frozenset(self.credential_headers)

    @field_validator("allowed_networks", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        networks = []
        for item in value:
            if not isinstance(item, str):  # ip_network(1) and ip_network(true) would mean 0.0.0.1/32
                raise ValueError(
                    f'{item!r} is not an IP network such as "127.0.0.0/8" (write it as a string)'
                )
            try:
                networks.append(ipaddress.ip_network(item))
            except (TypeError, ValueError) as exc:
                raise ValueError(f'{item!r} is not an IP network such as "127.0.0.0/8": {exc}') from None
        return networks


class WorkerSection(_Model):
    concurrency: Annotated[int, Field(ge=1, le=10000)] = 100
    poll_delay_s: Annotated[float, Field(gt=0, le=5)] = 0.02
    lease_margin_s: Annotated[float, Field(gt=0, le=600)] = 5.0
    reconcile_interval_s: Annotated[float, Field(gt=0, le=600)] = 1.0
    # On SIGTERM a worker takes no more attempts and gives those it is sending this long to end;
    # it then hands back the rest (each is recorded as worker_stopped and retried at once).
    shutdown_grace_s: Annotated[float, Field(ge=0, le=3600)] = 15.0


class RetentionSection(_Model):
    delivered_days: Annotated[float, Field(gt=0)] = 7
    dead_days: Annotated[float, Field(gt=0)] = 30
    every_s: Annotated[int, Field(ge=1, le=60)] = 60  # how often retention runs (one worker at a time)

    @field_validator("every_s")
    @classmethod
    def _divides_a_minute(cls, every_s: int) -> int:
        if 60 % every_s:
            raise ValueError("every_s must divide 60 (retention runs at fixed seconds of each minute)")
        return every_s


class Config(_Model):
    gateway: GatewaySection = GatewaySection()
    worker: WorkerSection = WorkerSection()
    retention: RetentionSection = RetentionSection()
    alerts: list[Alert] = []
    integrations: list[Integration] = []

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        seen: set[str] = set()
        for integration in self.integrations:
            if integration.name in seen:
                raise ValueError(f"integration name {integration.name!r} is used twice")
            seen.add(integration.name)
        return self

    def integration(self, name: str) -> Integration | None:
        """A configured integration, or an alert sink's (named "_alert-N"), by name."""
        return self._by_name.get(name)

    @cached_property
    def alert_sinks(self) -> list[Integration]:
        """Each [[alerts]] entry as an internal integration, so alerts are delivered with retries
        like any event. Built once (the config does not change while it is loaded)."""
        return [
            Integration.model_construct(
                name=f"_alert-{n}",
                target=alert.url,
                mode="relay",
                timeout_s=10.0,
                failure_threshold=1 << 30,
                probe=False,
                probe_cooldown_s=30.0,
                probe_cooldown_max_s=900.0,
                drain_rate_per_s=100.0,
                inbound_token=None,
                signing_secrets=[],
                headers={},
                retry=RetryPolicy(max_attempts=10, backoff_base_s=1, backoff_max_s=300, max_age_s=86400),
                proxy=ProxyPolicy(),
                max_in_flight=DEFAULT_MAX_IN_FLIGHT,
                rate_limit_per_s=None,
                rate_limit_burst=None,
                ordered=False,
            )
            for n, alert in enumerate(self.alerts)
        ]

    @cached_property
    def _by_name(self) -> dict[str, Integration]:
        return {i.name: i for i in [*self.integrations, *self.alert_sinks]}

    @property
    def longest_timeout_s(self) -> float:
        return max((i.timeout_s for i in self.integrations), default=10.0)


def _expand(
    value: Any, path: str, env: Mapping[str, str], source: str, in_query: dict[str, list[str]]
) -> Any:
    """`value` with its variables replaced; what they put after a `?` is noted in `in_query`
    under the value's path (a key in a target's query is a secret to redact when shown)."""
    if isinstance(value, str):

        def lookup(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if default is not None:  # ${NAME:-default}, as in a shell: unset or empty takes the default
                found = env.get(name) or default
            elif name not in env:
                raise ConfigError(source, path, f"environment variable {name} is not set")
            else:
                found = env[name]
            if "?" in value[: match.start()]:
                in_query.setdefault(path, []).append(found)
            return found

        return _VAR.sub(lookup, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{path}.{k}" if path else k, env, source, in_query) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{path}[{i}]", env, source, in_query) for i, v in enumerate(value)]
    return value


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_config(text: str, source: str, env: Mapping[str, str]) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"not valid TOML: {exc}") from None
    in_query: dict[str, list[str]] = {}
    expanded = _expand(raw, "", _with_env_files(raw, source, env), source, in_query)
    try:
        config = Config.model_validate(expanded)
    except ValidationError as exc:
        first = exc.errors()[0]
        reason = first["msg"].removeprefix("Value error, ")
        raise ConfigError(source, _field_path(first["loc"]), reason) from None
    for n, integration in enumerate(config.integrations):
        integration._url_secrets = tuple(in_query.get(f"integrations[{n}].target", ()))
    return config


def _with_env_files(raw: dict[str, Any], source: str, env: Mapping[str, str]) -> Mapping[str, str]:
    """`env` and, below it, the variables of `[gateway] env_files` (the process environment wins,
    as with python-dotenv's default): a missing or unreadable file is an error, never a silently
    empty secret."""
    section = raw.get("gateway")
    names = section.get("env_files") if isinstance(section, dict) else None
    if not names:
        return env
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(source, "gateway.env_files", "must be a list of file names")
    from dotenv import dotenv_values

    merged: dict[str, str] = {}
    for n, name in enumerate(names):
        path = Path(source).parent / name
        field = f"gateway.env_files[{n}]"
        if not path.is_file():
            raise ConfigError(source, field, f"{path}: file not found")
        try:
            values = dotenv_values(path, interpolate=False, encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(source, field, f"{path} cannot be read: {exc}") from None
        merged.update({k: v for k, v in values.items() if v is not None})
    return {**merged, **env}


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, "", f"cannot be read: {exc}") from None
    return parse_config(text, source, os.environ if env is None else env)


@dataclass(frozen=True)
class Settings:
    """Everything a process needs, read once at start and passed explicitly."""

    config: Config
    config_path: str
    redis_url: str
    key_prefix: str
    public_url: str = DEFAULT_URL
    admin_token: SecretStr | None = None
    sealer: Sealer | None = None  # from GATEWAY_SECRET_KEY

    def unsealed_reason(self) -> str | None:
        """Why `serve` and `worker` will not start as configured: credentials would be kept in
        clear without anybody having said so. None when they may start."""
        if self.sealer is not None or self.config.gateway.store_credentials == "plain":
            return None
        return (
            "GATEWAY_SECRET_KEY is not set, so credential headers would be stored in Redis in clear; "
            "set it (`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`) or set "
            '[gateway] store_credentials = "plain" in the config to store them in clear on purpose'
        )

    @classmethod
    def from_env(cls, config_path: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        path = config_path or env.get("GATEWAY_CONFIG") or DEFAULT_CONFIG_PATH
        redis_url = env.get("REDIS_URL") or DEFAULT_REDIS_URL
        if not redis_url.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://")):
            raise ConfigError(
                "REDIS_URL", "", "must start with redis://, rediss://, unix:// or redis+sentinel://"
            )
        if redis_url.startswith("redis+sentinel://"):
            from gateway.redis_url import parse_sentinel

            parse_sentinel(redis_url)  # a malformed one is refused here, before anything starts
        prefix = env.get("GATEWAY_KEY_PREFIX") or "gw"
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", prefix):
            raise ConfigError("GATEWAY_KEY_PREFIX", "", "use 1-32 letters, digits, '_', '.' or '-'")
        token = env.get("GATEWAY_ADMIN_TOKEN")
        public_url = (env.get("GATEWAY_URL") or DEFAULT_URL).rstrip("/")
        keys = env.get(SECRET_KEY_ENV)
        return cls(
            load_config(path, env),
            path,
            redis_url,
            prefix,
            public_url,
            SecretStr(token) if token else None,
            Sealer.from_text(keys) if keys else None,
        )
