"""REDIS_URL, read once for every process: the API's pool (redis-py) and the workers' (arq).

Forms:
    redis://[user:password@]host:port/db            plain TCP, with an ACL user or a password
    rediss://[user:password@]host:port/db?ssl_ca_certs=/path/ca.pem[&ssl_certfile=...&ssl_keyfile=...]
                                                    TLS; redis-py's own query arguments
                                                    (ssl_cert_reqs, ssl_check_hostname...)
    unix:///path/to/redis.sock[?db=N]               a local socket
    redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]
                                                    Redis Sentinel: the sentinels, and the name of
                                                    the primary they watch; user and password are
                                                    the primary's (sentinels that require a
                                                    password of their own are not supported yet)

redis-py parses the first three (`redis.connection.parse_url`); arq's `RedisSettings.from_dsn`
drops the TLS arguments and knows no Sentinel URL, so the workers' settings are built from
redis-py's parse here instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from arq.connections import RedisSettings
from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel
from redis.connection import parse_url

from gateway.errors import ConfigError

SENTINEL_SCHEME = "redis+sentinel"


@dataclass(frozen=True)
class SentinelURL:
    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_sentinel(url: str) -> SentinelURL:
    """A redis+sentinel:// URL, or ConfigError saying what is wrong with it."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    sentinels = []
    for host in netloc.split(","):
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "26379")
        if not name or not port.isdigit():
            raise ConfigError("REDIS_URL", "sentinels", f"{host!r} is not host:port")
        sentinels.append((name.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError("REDIS_URL", "service", "write redis+sentinel://host:port,.../service-name[/db]")
    if parts.query:
        raise ConfigError("REDIS_URL", "query", "a redis+sentinel:// URL takes no query arguments")
    userinfo = parts.netloc.rpartition("@")[0]
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    return SentinelURL(
        sentinels,
        unquote(path[0]),
        int(path[1]) if len(path) == 2 else 0,
        unquote(username) or None,
        unquote(password) or None,
    )


def client(url: str, **options: Any) -> Redis:
    """The API's pool: a Redis client for any of the forms above; `options` are redis-py's."""
    if url.startswith(SENTINEL_SCHEME + "://"):
        target = parse_sentinel(url)
        sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            target.sentinels, sentinel_kwargs=sentinel_options, **options
        )
        primary: Redis = sentinel.master_for(
            target.service, db=target.db, username=target.username, password=target.password
        )
        return primary
    created: Redis = Redis.from_url(url, **options)
    return created


def arq_settings(url: str) -> RedisSettings:
    """The workers' settings (arq), from the same URL, TLS arguments and Sentinel included."""
    if url.startswith(SENTINEL_SCHEME + "://"):
        target = parse_sentinel(url)
        return RedisSettings(
            host=target.sentinels,
            sentinel=True,
            sentinel_master=target.service,
            database=target.db,
            username=target.username,
            password=target.password,
        )
    kwargs = parse_url(url)  # type: ignore[no-untyped-call]
    known = {f: kwargs.pop(f) for f in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs") if f in kwargs}
    settings = RedisSettings(
        host=kwargs.pop("host", "localhost"),
        port=int(kwargs.pop("port", 6379)),
        unix_socket_path=kwargs.pop("path", None),
        database=int(kwargs.pop("db", 0)),
        username=kwargs.pop("username", None),
        password=kwargs.pop("password", None),
        ssl=url.startswith("rediss://"),
        ssl_cert_reqs=kwargs.pop("ssl_cert_reqs", "required"),
        ssl_check_hostname=_flag(kwargs.pop("ssl_check_hostname", False)),
        **known,
    )
    return settings


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
