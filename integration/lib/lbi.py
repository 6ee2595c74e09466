#!/usr/bin/env python3
"""Small helpers for the lbagent integration scenario (integration/run.sh and the compose file).

Standard library only. Subcommands:

  echo      a "node": an HTTP/1.0 echo backend answering "<name> <local-ip>:<port>"
  ipserve   a "what is my IP" endpoint: GET /<name> answers the text of <dir>/<name>, re-read
            on every request
  client    a load loop: many short connections through a frontend, one log line per request
  wait-http polls a URL until it answers 200
  wait-reach polls a frontend until every given node has answered through it
  wait-log  waits until a client log shows replies matching a text after a moment
  report    counts a run's requests and failures from the client logs
  free-port prints a port nobody listens on, optionally inside a range

Every wait has a deadline; nothing waits without one.
"""

import argparse
import http.server
import os
import random
import re
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.request


def now():
    return time.time()


def split_addr(s):
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------------------------
# echo
# --------------------------------------------------------------------------------------------


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        conn = self.request
        conn.settimeout(5)
        data = b""
        try:
            # Read the request head; a health check connects and closes without sending one.
            while b"\r\n\r\n" not in data and len(data) < 16384:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            ip, port = conn.getsockname()[:2]
            body = f"{self.server.node_name} {ip}:{port}\n".encode()
            head = (
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            conn.sendall(head + body)
        except OSError:
            pass


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


def cmd_echo(a):
    servers = []
    for listen in a.listen:
        host, port = split_addr(listen)
        srv = EchoServer((host, port), EchoHandler)
        srv.node_name = a.name
        servers.append(srv)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    if a.ready_file:
        write_atomic(a.ready_file, "ready\n")
    print(f"echo {a.name}: listening on {', '.join(a.listen)}", flush=True)
    wait_for_signal()


def wait_for_signal():
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        stop.wait(3600)


def write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# ipserve
# --------------------------------------------------------------------------------------------


def cmd_ipserve(a):
    base = a.dir

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.strip("/")
            try:
                if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name.startswith("."):
                    raise OSError(f"no such name {name!r}")
                with open(os.path.join(base, name)) as f:
                    body = f.read().strip().encode() + b"\n"
                status = 200
            except OSError as e:
                body, status = f"{e}\n".encode(), 503
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    host, port = split_addr(a.listen)
    srv = http.server.ThreadingHTTPServer((host, port), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    if a.ready_file:
        write_atomic(a.ready_file, "ready\n")
    wait_for_signal()


# --------------------------------------------------------------------------------------------
# client
# --------------------------------------------------------------------------------------------


def one_request(host, port, connect_timeout, total_timeout):
    """One HTTP/1.0 request on a fresh connection; returns (ok, text)."""
    deadline = now() + total_timeout
    try:
        with socket.create_connection((host, port), timeout=connect_timeout) as s:
            s.settimeout(max(0.05, deadline - now()))
            s.sendall(b"GET / HTTP/1.0\r\nHost: lbi\r\nUser-Agent: lbi-client\r\n\r\n")
            data = b""
            while True:
                s.settimeout(max(0.05, deadline - now()))
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        return False, f"{type(e).__name__}: {e}"
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False, f"no response head ({len(data)} bytes)"
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if " 200 " not in status + " ":
        return False, f"status {status!r}"
    text = body.decode(errors="replace").strip()
    if not text:
        return False, "empty body"
    return True, text


def cmd_client(a):
    host, port = split_addr(a.target)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    interval = 1.0 / a.rate
    end = now() + a.max_seconds if a.max_seconds > 0 else float("inf")
    out = open(a.log, "a", buffering=1) if a.log else sys.stdout
    sent = failed = 0
    last_summary = now()
    next_at = now()
    while not stop.is_set() and now() < end:
        if a.stop_file and os.path.exists(a.stop_file):
            break
        t0 = now()
        ok, text = one_request(host, port, a.connect_timeout, a.timeout)
        t1 = now()
        sent += 1
        failed += 0 if ok else 1
        if a.log:
            out.write(f"{t0:.6f} {t1:.6f} {a.name} {'OK' if ok else 'FAIL'} {text}\n")
        elif not ok:
            print(f"{a.name}: request failed: {text}", flush=True)
        if a.summary_every > 0 and t1 - last_summary >= a.summary_every:
            print(f"{a.name}: {sent} requests, {failed} failed", flush=True)
            last_summary = t1
        # Pacing: the only sleep, and it is not used to wait for anything.
        next_at += interval
        delay = next_at - now()
        if delay > 0:
            stop.wait(delay)
        else:
            next_at = now()
    if a.log:
        out.close()


# --------------------------------------------------------------------------------------------
# waits and report
# --------------------------------------------------------------------------------------------


def cmd_wait_http(a):
    deadline = now() + a.timeout
    last = "no attempt"
    while now() < deadline:
        try:
            with urllib.request.urlopen(a.url, timeout=2) as r:
                if r.status == 200:
                    return 0
                last = f"status {r.status}"
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = str(e)
        time.sleep(0.05)
    print(f"wait-http: {a.url} did not answer 200 within {a.timeout}s: {last}", file=sys.stderr)
    return 1


def cmd_wait_reach(a):
    """Requests through `target` until a reply has contained each `match`; prints the seconds
    it took (since `--since`, a Unix time, when given)."""
    host, port = split_addr(a.target)
    start = a.since if a.since else now()
    deadline = now() + a.timeout
    missing = list(a.match)
    last = "no attempt"
    while True:
        ok, text = one_request(host, port, 1.0, 2.0)
        if ok:
            missing = [m for m in missing if m not in text]
            last = text
        else:
            last = text
        if not missing:
            print(f"{now() - start:.3f}")
            return 0
        if now() >= deadline:
            print(
                f"wait-reach: {a.target} did not reach {missing} within {a.timeout}s "
                f"(last: {last})",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.02)


def read_log(path):
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        if not line.endswith("\n"):
            break  # still being written
        parts = line.rstrip("\n").split(" ", 4)
        if len(parts) < 4:
            continue
        out.append((float(parts[0]), float(parts[1]), parts[2], parts[3], parts[4] if len(parts) > 4 else ""))
    return out


def cmd_wait_log(a):
    """Waits until `count` OK replies containing `match` ended after `after`; prints how long
    after `after` the first one ended (seconds)."""
    deadline = now() + a.timeout
    while True:
        hits = [r for r in read_log(a.log) if r[1] >= a.after and r[3] == "OK" and a.match in r[4]]
        if len(hits) >= a.count:
            print(f"{hits[0][1] - a.after:.3f}")
            return 0
        if now() >= deadline:
            print(
                f"wait-log: {len(hits)}/{a.count} replies matching {a.match!r} in {a.log} "
                f"within {a.timeout}s",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.05)


def cmd_report(a):
    total = failed = 0
    failures = []
    per_target = {}
    for path in a.log:
        for t0, t1, name, status, text in read_log(path):
            total += 1
            st = per_target.setdefault(name, {"sent": 0, "failed": 0, "nodes": {}})
            st["sent"] += 1
            if status != "OK":
                failed += 1
                st["failed"] += 1
                failures.append(f"  {time.strftime('%H:%M:%S', time.localtime(t0))}"
                                f".{int(t0 % 1 * 1000):03d} {name}: {text}")
            else:
                node = text.split(" ", 1)[0]
                st["nodes"][node] = st["nodes"].get(node, 0) + 1
    for name, st in sorted(per_target.items()):
        nodes = ", ".join(f"{n} {c}" for n, c in sorted(st["nodes"].items()))
        print(f"  {name}: {st['sent']} sent, {st['failed']} failed ({nodes})")
    print(f"requests sent: {total}, failed: {failed}")
    for f in failures[:20]:
        print(f)
    if len(failures) > 20:
        print(f"  ... and {len(failures) - 20} more")
    return 0


def cmd_free_port(a):
    lo, hi = a.range
    candidates = list(range(lo, hi + 1))
    random.shuffle(candidates)
    for port in candidates[:2000]:
        ok = True
        for host in a.host:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((host, port))
            except OSError:
                ok = False
                break
        if ok:
            print(port)
            return 0
    print(f"free-port: nothing free in {lo}-{hi} on {a.host}", file=sys.stderr)
    return 1


def main():
    p = argparse.ArgumentParser(prog="lbi.py")
    sub = p.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("echo")
    e.add_argument("--name", required=True)
    e.add_argument("--listen", action="append", required=True, help="ADDR:PORT, repeatable")
    e.add_argument("--ready-file")

    i = sub.add_parser("ipserve")
    i.add_argument("--dir", required=True)
    i.add_argument("--listen", required=True)
    i.add_argument("--ready-file")

    c = sub.add_parser("client")
    c.add_argument("--name", required=True)
    c.add_argument("--target", required=True, help="HOST:PORT")
    c.add_argument("--rate", type=float, default=50.0, help="requests per second")
    c.add_argument("--log")
    c.add_argument("--stop-file")
    c.add_argument("--max-seconds", type=float, default=0.0, help="0: until a signal")
    c.add_argument("--connect-timeout", type=float, default=2.0)
    c.add_argument("--timeout", type=float, default=5.0)
    c.add_argument("--summary-every", type=float, default=0.0)

    w = sub.add_parser("wait-http")
    w.add_argument("url")
    w.add_argument("--timeout", type=float, default=20.0)

    wr = sub.add_parser("wait-reach")
    wr.add_argument("--target", required=True)
    wr.add_argument("--match", action="append", required=True)
    wr.add_argument("--timeout", type=float, default=20.0)
    wr.add_argument("--since", type=float, help="Unix time to measure from [default: now]")

    wl = sub.add_parser("wait-log")
    wl.add_argument("--log", required=True)
    wl.add_argument("--after", type=float, required=True)
    wl.add_argument("--match", required=True)
    wl.add_argument("--count", type=int, default=1)
    wl.add_argument("--timeout", type=float, default=10.0)

    r = sub.add_parser("report")
    r.add_argument("--log", action="append", required=True)

    f = sub.add_parser("free-port")
    f.add_argument("--host", action="append", default=None)
    f.add_argument("--range", type=int, nargs=2, default=[30000, 32767])

    a = p.parse_args()
    if a.cmd == "free-port" and not a.host:
        a.host = ["127.0.0.1"]
    handler = {
        "echo": cmd_echo,
        "ipserve": cmd_ipserve,
        "client": cmd_client,
        "wait-http": cmd_wait_http,
        "wait-reach": cmd_wait_reach,
        "wait-log": cmd_wait_log,
        "report": cmd_report,
        "free-port": cmd_free_port,
    }[a.cmd]
    return handler(a) or 0


if __name__ == "__main__":
    sys.exit(main())
