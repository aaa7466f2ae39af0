"""What one client may cost the API (issue 13, item 2): header bytes and count (431), the time a
request has to arrive (408), the connections kept (the slowest make room), the open-files limit.
Each runs against the real `gateway serve`, with raw sockets playing the misbehaving client."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import redis

from gateway.limits import Limits, connection_cap
from tests.conftest import Gateway, integration_toml, stored_keys, wait_until
from tests.upstream import Reply, Upstream

LIMITS = "max_header_bytes = 4096\nmax_header_count = 20\nread_timeout_s = 0.5\nmax_connections = 20\n"


def start(gateway: Gateway) -> Gateway:
    return gateway.configure(integration_toml("crm", "http://127.0.0.1:9/"), gateway=LIMITS).start_api()


def connect(gateway: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gateway.port), timeout=10)


def answer_of(sock: socket.socket) -> tuple[int, dict[str, str]]:
    """The status and JSON body of the answer, read until the gateway closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), orjson.loads(body)


def one_answer(sock: socket.socket) -> bytes:
    """One whole answer on a keep-alive connection (its head and body may come in two reads)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head


def send_all_you_can(sock: socket.socket, data: bytes) -> None:
    """Sends until the gateway stops listening (it answers and closes long before a huge head ends)."""
    try:
        for start in range(0, len(data), 65536):
            sock.sendall(data[start : start + 65536])
    except (BrokenPipeError, ConnectionResetError):
        pass


def post(headers: bytes = b"", body: bytes = b"{}") -> bytes:
    return (
        b"POST /hooks/crm HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        + headers
        + b"content-length: %d\r\n\r\n" % len(body)
        + body
    )


def test_oversized_or_too_many_headers_get_431_json_and_store_nothing(
    gateway: Gateway, rdb: redis.Redis
) -> None:
    start(gateway)
    before = stored_keys(rdb)
    for headers in (
        b"x-big: " + b"a" * (8 * 1024 * 1024) + b"\r\n",  # 8 MiB in one header
        b"".join(b"x-h%d: v\r\n" % n for n in range(25)),  # small, but too many
        b"x-split: " + b"b" * 4000 + b"\r\n",  # the head just over the limit
    ):
        with connect(gateway) as sock:
            send_all_you_can(sock, post(headers))
            status, body = answer_of(sock)
        assert status == 431
        assert body["error"] == "header_fields_too_large" and "4096 bytes" in body["detail"]
    # Just under the limits: accepted as ever.
    fits = b"x-fits: " + b"c" * 3000 + b"\r\n" + b"".join(b"x-h%d: v\r\n" % n for n in range(10))
    with connect(gateway) as sock:
        sock.sendall(post(fits))
        assert one_answer(sock).startswith(b"HTTP/1.1 202")
    # A later request on a kept-alive connection is held to the same limits.
    with connect(gateway) as sock:
        sock.sendall(post())
        assert one_answer(sock).startswith(b"HTTP/1.1 202")
        sock.sendall(post(b"".join(b"x-h%d: v\r\n" % n for n in range(25))))
        status, body = answer_of(sock)
        assert status == 431 and body["error"] == "header_fields_too_large"
    # A request pipelined in the same write as the one before it, or after empty lines (which the
    # parser skips), is held to the same limits: both got through the rewrite's count.
    many = b"".join(b"x-h%d: v\r\n" % n for n in range(25))
    for sent in (
        post() + post(many, body=b'{"late":1}'),
        b"\r\n\r\n" + post(b"x-big: " + b"d" * 5000 + b"\r\n"),
    ):
        with connect(gateway) as sock:
            sock.sendall(sent)
            answers = b""
            while chunk := sock.recv(65536):
                answers += chunk
        # The answer to the request before it goes first, then the 431, and the connection closes.
        assert answers.count(b"HTTP/1.1 ") == sent.count(b"POST "), answers
        assert answers.split(b"HTTP/1.1 ")[-1].startswith(b"431 ") and answers.count(b"HTTP/1.1 431") == 1
    # Requests sent back to back on one connection, bodies larger than the head limit: heads are
    # counted, bodies are not.
    big = post(body=b'{"pad":"' + b"p" * 20000 + b'"}')
    with connect(gateway) as sock:
        sock.sendall(big + post(fits) + big)
        answers = b""
        while answers.count(b"HTTP/1.1 ") < 3 and (chunk := sock.recv(65536)):
            answers += chunk
        assert answers.count(b"HTTP/1.1 202") == 3, answers
    assert len(stored_keys(rdb) - before) > 0  # the accepted events, and nothing of the others
    assert gateway.api is not None and gateway.api.poll() is None


def test_a_request_that_does_not_arrive_in_time_gets_408_and_stores_nothing(
    gateway: Gateway, rdb: redis.Redis, upstream: Upstream
) -> None:
    crm = integration_toml("crm", "http://127.0.0.1:9/")
    gateway.configure(crm, integration_toml("slow", upstream.url, mode="proxy"), gateway=LIMITS).start_api()
    before = stored_keys(rdb)
    with contextlib.ExitStack() as opened:  # closed also when an assertion fails
        silent, half_head, half_body = (opened.enter_context(connect(gateway)) for _ in range(3))
        half_head.sendall(b"POST /hooks/crm HTTP/1.1\r\nhost: gw\r\n")  # silent says nothing at all
        half_body.sendall(b'POST /hooks/crm HTTP/1.1\r\nhost: gw\r\ncontent-length: 100\r\n\r\n{"n":')
        for sock in (silent, half_head, half_body):
            status, body = answer_of(sock)  # the gateway answers and closes after 0.5 s
            assert status == 408 and body["error"] == "request_timeout"
    assert stored_keys(rdb) == before

    # A keep-alive connection: its second request has a deadline of its own.
    with connect(gateway) as sock:
        sock.sendall(post())
        assert one_answer(sock).startswith(b"HTTP/1.1 202")
        time.sleep(0.3)
        sock.sendall(post())  # 0.8 s after the connection opened: in time, as it is its own
        assert one_answer(sock).startswith(b"HTTP/1.1 202")
        # Empty lines, which the parser skips, are a request's first bytes too: sent one at a
        # time they held the connection for good (each also put off uvicorn's keep-alive timeout).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(20):
                sock.sendall(b"\r\n")
                time.sleep(0.1)
        status, body = answer_of(sock)
        assert status == 408 and body["error"] == "request_timeout"

    # A request whose answer takes longer than the deadline (the upstream answers after 1 s) is
    # not cut once it has arrived whole; a late request pipelined behind it gets its 408 after
    # that answer, not in its place.
    upstream.script([Reply(200, body=b'{"ok":1}', delay_s=1.0)])
    with connect(gateway) as sock:
        sock.sendall(b"GET /hooks/slow/a HTTP/1.1\r\nhost: gw\r\n\r\nPOST /hooks/crm HTTP/1.1\r\n")
        answers = b""
        while chunk := sock.recv(65536):
            answers += chunk
    assert answers.startswith(b"HTTP/1.1 200 ") and b'{"ok":1}HTTP/1.1 408 ' in answers, answers


def test_past_the_connection_cap_the_longest_waiting_make_room(gateway: Gateway) -> None:
    start(gateway)
    with contextlib.ExitStack() as opened:
        idle = [opened.enter_context(connect(gateway)) for _ in range(40)]  # twice the cap, all silent
        time.sleep(0.1)
        # The helpdesk still gets through, on a new connection.
        response = httpx.post(gateway.url + "/hooks/crm", content=b"{}", timeout=10)
        assert response.status_code == 202
        closed = 0
        for sock in idle:
            sock.settimeout(0.05)
            with contextlib.suppress(TimeoutError):  # still open: recv waits
                closed += sock.recv(1) == b""
    assert closed >= 20  # the oldest ones were closed to keep at most 20
    # Counted apart from other refusals, by the reason the metrics already carry.
    wait_until(lambda: 'reason="connection_cap"' in httpx.get(gateway.url + "/metrics", timeout=10).text)


def test_the_api_raises_its_open_files_limit(gateway: Gateway) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 256:
        raise AssertionError(f"this machine's hard limit of open files is {hard}: the test needs more")
    gateway.configure(integration_toml("crm", "http://127.0.0.1:9/"))
    env = gateway.env
    api = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(gateway.port)],
        env=env,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _answers(gateway.url), timeout=15)
        limits = Path(f"/proc/{api.pid}/limits").read_text()
        line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert line.split()[3] == str(hard), line
    finally:
        api.terminate()
        api.wait(timeout=10)
    assert connection_cap(Limits(1, 1, 1.0, 4096), 1024) == 1024 - 128  # within the files it has
    assert connection_cap(Limits(1, 1, 1.0, 100), 1 << 20) == 100


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_limits_are_checked_by_check_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[gateway]\nmax_header_bytes = 10\n" + integration_toml("crm", "http://127.0.0.1:9/"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "gateway.max_header_bytes" in done.stderr and "1024" in done.stderr
    assert "Traceback" not in done.stderr
