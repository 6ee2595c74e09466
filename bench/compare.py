#!/usr/bin/env python3
"""The old design against lbagent, same workload, same run, one table.

Run it through bench/compare.sh (which builds lbagent, makes the temp directory and cleans up
behind it). Four systems, one after the other, each on its own frontend port:

  A  webhook + update-haproxy.sh, reload  (bench/baseline/, SIGUSR2 to HAProxy's master)
  B  webhook + update-haproxy.sh, restart (stop HAProxy, start it again)
  L  lbagent, managed mode (its own HAProxy, same binary and same global/defaults)
  F  the floor: no control plane; the bench sends lbagent's one command for an address change
     (`set server B/S addr`) straight to HAProxy's admin socket. What HAProxy and this
     instrument take on their own, so lbagent's figures can be read against it.

Two echo "nodes", 127.0.0.2:P and 127.0.0.3:P, greet each connection with their address and
the moment they accepted it, then echo. Each system first gets a frontend routed to 127.0.0.2
(not measured); then, with a steady client load (short connections through the frontend) and
HOLD long-lived connections held open through it, N address changes (100 by default, so the
p99 is the second slowest, not the slowest) alternate the node between the two addresses. For
each change:

  latency   request sent (its bytes written, after signing) -> the new address accepts a
            connection through the frontend, by the node's own clock stamp. The frontend is
            probed from the moment the request is sent, while it is in flight: a new probe
            connection every 0.2 ms, up to 3 at once, for 20 ms, then every 1 ms.
  seen      the same, but until the probe reads the node's answer back (the client's view;
            adds the return trip through HAProxy)
  answer    request sent -> the HTTP answer (the webhook answers before its script runs)
  then the bench waits until the system is idle (the baseline: every script run has finished)
  and paces 0.3 s before the next change. The update requests go over one kept-alive
  connection per system, written and read with plain socket calls.

Then a burst of BURST changes sent back to back (the old webhook answers before its script runs,
so its runs overlap): updates/s = BURST / (first send -> every change applied and the frontend
serving the last address), and whether it ends on the last address.

Resident memory of the control plane: the process (webhook or lbagent) and its children
(update-haproxy.sh, `haproxy -c`, ...), never the HAProxy that serves traffic; idle is one
sample before the first change, peak the largest of samples taken every 50 ms over the run.
"""

import argparse
import asyncio
import hashlib
import gc
import hmac
import http.client
import json
import math
import multiprocessing as mp
import os
import random
import secrets
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE_HOME = os.path.join(ROOT, "bench", "baseline")
NODE_A = "127.0.0.2"
NODE_B = "127.0.0.3"
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


class BenchError(Exception):
    pass


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_port():
    """A port in the NodePort range free on both node addresses."""
    rnd = random.Random()
    for _ in range(200):
        p = rnd.randint(30000, 32767)
        socks = []
        try:
            for ip in (NODE_A, NODE_B):
                s = socket.socket()
                socks.append(s)
                s.bind((ip, p))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise BenchError("no free port in 30000-32767 on 127.0.0.2 and 127.0.0.3")


def wait_until(what, cond, timeout, step=0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise BenchError(f"timed out after {timeout} s waiting for {what}")


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- helper processes


def echo_main(port, ready):
    """The two nodes. Each greets a connection with `<its address> <monotonic ns>`: the moment
    it accepted, so traffic reaching an address is timed where it arrives (CLOCK_MONOTONIC is
    one clock for every process). A bare asyncio Protocol, not streams: no task per
    connection."""

    class Echo(asyncio.Protocol):
        def __init__(self, name):
            self.name = name

        def connection_made(self, transport):
            self.transport = transport
            transport.write(b"%s %d\n" % (self.name, time.monotonic_ns()))

        def data_received(self, data):
            self.transport.write(data)

    async def main():
        loop = asyncio.get_running_loop()
        servers = []
        for ip in (NODE_A, NODE_B):
            name = ip.encode()
            servers.append(
                await loop.create_server(
                    lambda n=name: Echo(n), ip, port, backlog=1024, reuse_address=True
                )
            )
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


async def short_conn(fe):
    """One short connection through the frontend: the name of the node that answered."""
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", fe), 2)
    try:
        line = await asyncio.wait_for(r.readline(), 2)
    finally:
        w.close()
    if not line.endswith(b"\n"):
        raise ConnectionError("closed before the node answered")
    return greeting(line)[0]


def greeting(line):
    """A node's greeting: (its address, when it accepted the connection, monotonic s)."""
    name, ns = line.split()
    return name.decode(), int(ns) / 1e9


def load_main(fe, rate, conc, stop, conn):
    """Steady client load: `rate` short connections per second over `conc` paced loops."""

    async def worker(k, out):
        interval = conc / rate
        nxt = time.monotonic() + k * interval / conc
        while not stop.is_set():
            now = time.monotonic()
            if nxt > now:
                await asyncio.sleep(nxt - now)  # load pacing
            nxt = max(nxt + interval, time.monotonic() - interval)
            t = time.monotonic()
            try:
                await short_conn(fe)
                out.append((t, True, ""))
            except Exception as e:  # noqa: BLE001 - every failure counts
                out.append((t, False, type(e).__name__))

    async def main():
        out = []
        await asyncio.gather(*(worker(k, out) for k in range(conc)))
        return out

    conn.send(asyncio.run(main()))


def hold_main(fe, n, connected, stop, conn):
    """n long-lived connections through the frontend, each pinged every 100 ms; a connection
    that is closed or reset is counted as cut and opened again."""

    async def holder(out):
        while not stop.is_set():
            w = None
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", fe), 2)
                line = await asyncio.wait_for(r.readline(), 2)
                if not line.endswith(b"\n"):
                    raise ConnectionError("no answer")
            except Exception:
                if w is not None:
                    w.close()
                await asyncio.sleep(0.05)  # retry pacing; failed re-opens are not counted
                continue
            with connected.get_lock():
                connected.value += 1
            try:
                while True:
                    await asyncio.sleep(0.1)  # ping pacing
                    if stop.is_set():
                        break
                    w.write(b"p")
                    await w.drain()
                    await asyncio.wait_for(r.readexactly(1), 2)
            except Exception as e:  # noqa: BLE001
                out.append((time.monotonic(), type(e).__name__))
            finally:
                with connected.get_lock():
                    connected.value -= 1
                w.close()

    async def main():
        out = []
        await asyncio.gather(*(holder(out) for _ in range(n)))
        return out

    conn.send(asyncio.run(main()))


def proc_stat(pid):
    """(ppid, comm, rss pages) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
    except OSError:
        return None
    r = s.rfind(b")")
    fields = s[r + 2 :].split()
    return int(fields[1]), s[s.find(b"(") + 1 : r], int(fields[21])


def proc_table():
    procs = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_stat(d)
            if st:
                procs[int(d)] = st
    return procs


class ControlPlane:
    """RSS of a root process and its descendants, leaving out the HAProxy that serves (any
    haproxy process that is not a `haproxy -c` check). Cheap enough to sample every 50 ms
    beside a latency measurement (~0.1 ms, against ~1.5 ms for a walk of all of /proc): a
    process seen outside the tree once is not read again (it can only leave the tree, by being
    reparented; a reused pid within one run is not worth the cost), nor is a serving HAProxy's
    command line."""

    def __init__(self, root):
        self.root = root
        self.outside = set()
        self.serving = set()

    def kib(self):
        procs = {}
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) not in self.outside:
                st = proc_stat(d)
                if st:
                    procs[int(d)] = st
        if self.root not in procs:
            return 0
        kids = {}
        for pid, (ppid, _, _) in procs.items():
            kids.setdefault(ppid, []).append(pid)
        tree, todo = set(), [self.root]
        while todo:
            pid = todo.pop()
            if pid in procs and pid not in tree:
                tree.add(pid)
                todo.extend(kids.get(pid, []))
        self.outside.update(pid for pid in procs if pid not in tree)
        total = 0
        for pid in tree:
            _, comm, rss = procs[pid]
            if pid in self.serving:
                continue
            if comm == b"haproxy" and pid != self.root:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        argv = f.read().split(b"\0")
                except OSError:
                    continue
                if b"-c" not in argv:
                    self.serving.add(pid)
                    continue
            total += rss * PAGE_KIB
        return total


def sample_main(root, stop, conn):
    tree = ControlPlane(root)
    out = []
    while not stop.is_set():
        out.append((time.monotonic(), tree.kib()))
        stop.wait(0.05)  # sampling period
    conn.send(out)


class Helper:
    """A helper process that runs until told to stop, then sends back its records."""

    def __init__(self, target, *args):
        ctx = mp.get_context("fork")
        self.stop = ctx.Event()
        self.parent, child = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=target, args=(*args, self.stop, child), daemon=True)
        self.proc.start()

    def finish(self, timeout=10):
        self.stop.set()
        out = self.parent.recv() if self.parent.poll(timeout) else None
        self.proc.join(3)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(3)
        if out is None:
            raise BenchError(f"helper {self.proc.name} sent nothing back")
        return out


# ---------------------------------------------------------------- probes


def probe(fe, timeout=2.0):
    with socket.create_connection(("127.0.0.1", fe), timeout=timeout) as s:
        buf = b""
        while not buf.endswith(b"\n"):
            d = s.recv(64)
            if not d:
                raise ConnectionError("closed before the node answered")
            buf += d
        return greeting(buf)[0]


def wait_for_answer(fe, want, timeout, client=None, depth=3, spacing=0.0002):
    """Polls the frontend with short connections until `want` answers: (when the answer was
    read here, when the node accepted that connection), or None.

    A new probe starts every `spacing` seconds (every 1 ms after the first 20 ms), with up to
    `depth` in flight at once, so the answer is seen within about `spacing` of the first
    connection routed to the new address, not within a whole probe's round trip (~0.5 ms
    through HAProxy here). With `client`, also notes when its update request is answered."""
    start = time.monotonic()
    end = start + timeout
    sel = selectors.DefaultSelector()
    bufs = {}
    due = start

    def drop(s):
        sel.unregister(s)
        del bufs[s]
        s.close()

    try:
        while True:
            now = time.monotonic()
            if now > end:
                return None
            if len(bufs) < depth and now >= due:
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", fe))
                sel.register(s, selectors.EVENT_READ)
                bufs[s] = b""
                due = now + (spacing if now - start < 0.02 else 0.001)
            wait = max(0.0, due - time.monotonic()) if len(bufs) < depth else 0.05
            for key, _ in sel.select(wait):
                s = key.fileobj
                try:
                    d = s.recv(64)
                except BlockingIOError:
                    continue
                except OSError:
                    d = b""
                if not d:
                    drop(s)
                    continue
                bufs[s] += d
                if bufs[s].endswith(b"\n"):
                    name, accepted = greeting(bufs[s])
                    drop(s)
                    if name == want:
                        return time.monotonic(), accepted
            if client is not None:
                client.note_answer()
    finally:
        for s in list(bufs):
            drop(s)
        sel.close()


def update(system, fe, ip):
    """One update request, answered before it returns: its status."""
    system.send_update(fe, ip)
    return system.finish_update()[0]


# ---------------------------------------------------------------- the systems


class System:
    """What the systems share: their state directory names every process they start."""

    def serving_processes(self):
        return len(pids_naming(self.state, b"haproxy", serving=True))


def terminate(proc, within):
    """SIGTERM, then SIGKILL after `within` seconds."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(within)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Baseline(System):
    kind = "baseline"

    def __init__(self, variant, tmp, haproxy_bin, node_port):
        self.variant = variant  # "reload" or "restart"
        self.label = {"reload": "A: webhook + reload", "restart": "B: webhook + restart"}[variant]
        self.state = os.path.join(tmp, f"baseline-{variant}")
        self.haproxy_bin = haproxy_bin
        self.node_port = node_port
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.sent = 0
        self.webhook = None
        self.client = UpdateClient(self.port)

    def start(self):
        os.makedirs(self.state)
        with open(os.path.join(BASELINE_HOME, "global.cfg")) as f:
            text = f.read().replace("@STATE@", self.state)
        if os.environ.get("BASELINE_NO_EXPOSE_FD"):
            # Debian's stock stats socket line: no listener hand-over on reload.
            text = text.replace(" expose-fd listeners", "")
        for name in ("global.cfg", "haproxy.cfg"):
            with open(os.path.join(self.state, name), "w") as f:
                f.write(text)
        # The HAProxy that was already running on the VM: master-worker, no frontend yet.
        subprocess.run(
            [self.haproxy_bin, "-W", "-D", "-p", self.pidfile(), "-S",
             os.path.join(self.state, "master.sock") + ",mode,600",
             "-f", os.path.join(self.state, "haproxy.cfg")],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        env = dict(os.environ, BASELINE_HOME=BASELINE_HOME, BASELINE_STATE=self.state,
                   BASELINE_RELOAD=self.variant, WEBHOOK_TOKEN=self.token,
                   HAPROXY_BIN=self.haproxy_bin, FRONTEND_BIND="127.0.0.1")
        self.log = open(os.path.join(self.state, "webhook.log"), "w")
        self.webhook = subprocess.Popen(
            ["webhook", "-hooks", os.path.join(BASELINE_HOME, "hooks.json"), "-template",
             "-ip", "127.0.0.1", "-port", str(self.port),
             "-pidfile", os.path.join(self.state, "webhook.pid")],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.state,
        )
        wait_until("webhook to listen", lambda: port_open(self.port), 10)

    def pidfile(self):
        return os.path.join(self.state, "haproxy.pid")

    def root_pid(self):
        return self.webhook.pid

    def send_update(self, fe, ip):
        body = json.dumps({"name": "traefik", "frontend-port": str(fe),
                           "backend-port": str(self.node_port), "dst-ip": ip,
                           "action": "add"}).encode()
        headers = {"X-Funkypenguin-Token": self.token, "Content-Type": "application/json"}
        self.sent += 1
        self.client.send("POST", "/hooks/update-haproxy", body, headers)

    def finish_update(self):
        """(status, time the answer was first seen)."""
        status, _, answered = self.client.finish()
        return status, answered

    def runs(self):
        try:
            with open(os.path.join(self.state, "runs.log")) as f:
                return [line.split() for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def wait_idle(self, timeout=30):
        """Until every script run started so far has finished."""
        wait_until("update-haproxy.sh runs to finish", lambda: len(self.runs()) >= self.sent,
                   timeout, step=0.002)

    def failed_runs(self):
        return sum(1 for r in self.runs() if r[1] != "0")

    def stop(self):
        self.client.close()
        terminate(self.webhook, 5)
        kill_naming(self.state)


class Lbagent(System):
    label = "lbagent"
    kind = "lbagent"

    def __init__(self, binary, tmp, haproxy_bin, node_port):
        self.binary = binary
        self.haproxy_bin = haproxy_bin
        self.state = os.path.join(tmp, "lbagent")
        self.node_port = node_port
        self.port = free_port()
        self.proc = None
        self.client = UpdateClient(self.port)
        self.applied = {}

    def start(self):
        os.makedirs(self.state)
        self.log = open(os.path.join(self.state, "..", "lbagent.log"), "w")
        self.proc = subprocess.Popen(
            [self.binary, "--state-dir", self.state, "--listen", f"127.0.0.1:{self.port}",
             "--frontend-bind", "127.0.0.1", "--haproxy-bin", self.haproxy_bin],
            env=dict(os.environ, RUST_LOG="warn"), stdout=self.log, stderr=subprocess.STDOUT,
        )
        keys = os.path.join(self.state, "keys.toml")

        def up():
            if self.proc.poll() is not None:
                raise BenchError(f"lbagent exited with {self.proc.returncode}; see its log")
            return os.path.exists(keys) and port_open(self.port)

        wait_until("lbagent to listen", up, 30)
        with open(keys, "rb") as f:
            self.secret = tomllib.load(f)["default"].encode()

    def root_pid(self):
        return self.proc.pid

    def send_update(self, fe, ip):
        path = f"/v1/frontends/{fe}/servers/node-a"
        body = json.dumps({"node_ip": ip, "node_port": self.node_port,
                           "service": "traefik"}).encode()
        # docs/protocol.md: HMAC-SHA256 over METHOD, PATH, TIMESTAMP, NONCE, hex SHA-256(body).
        ts = str(int(time.time()))
        nonce = secrets.token_hex(16)
        msg = "\n".join(["PUT", path, ts, nonce, hashlib.sha256(body).hexdigest()])
        sig = hmac.new(self.secret, msg.encode(), hashlib.sha256).hexdigest()
        headers = {"X-Lbagent-Key": "default", "X-Lbagent-Timestamp": ts,
                   "X-Lbagent-Nonce": nonce, "X-Lbagent-Signature": "sha256=" + sig,
                   "Content-Type": "application/json"}
        self.client.send("PUT", path, body, headers)

    def finish_update(self):
        status, answer, answered = self.client.finish()
        try:
            kind = json.loads(answer).get("applied", "?")
        except ValueError:
            kind = "?"
        self.applied[kind] = self.applied.get(kind, 0) + 1
        return status, answered

    def wait_idle(self, timeout=30):
        pass  # a 200 means stored and applied to HAProxy

    def apply_histogram(self):
        """lbagent_apply_seconds from /metrics: ({le: cumulative count}, sum)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        buckets, total = {}, 0.0
        for line in text.splitlines():
            if line.startswith("lbagent_apply_seconds_bucket{le=\""):
                le = line.split('"')[1]
                buckets[math.inf if le == "+Inf" else float(le)] = int(line.split()[-1])
            elif line.startswith("lbagent_apply_seconds_sum "):
                total = float(line.split()[-1])
        return buckets, total

    def failed_runs(self):
        return 0

    def stop(self):
        self.client.close()
        terminate(self.proc, 10)
        kill_naming(self.state)


class Direct(System):
    """The floor: no control plane at all. The bench itself sends `set server ... addr` to
    HAProxy's admin socket, the one command lbagent sends for an address change, so its latency
    is what HAProxy and this instrument take: any runtime-API agent's best case here. Its
    HAProxy has the backend lbagent renders (a copy of src/render.rs's backend block: keep
    the two alike)."""

    label = "floor: the command alone"
    kind = "floor"

    def __init__(self, tmp, haproxy_bin, node_port):
        self.state = os.path.join(tmp, "direct")
        self.haproxy_bin = haproxy_bin
        self.node_port = node_port
        self.haproxy = None
        self.client = CommandClient(os.path.join(self.state, "admin.sock"))

    def start(self):
        os.makedirs(self.state)

    def root_pid(self):
        return os.getpid()  # no control plane: the sampler's figures are left out of the table

    def send_update(self, fe, ip):
        if self.haproxy is None:
            # The first update: HAProxy with the frontend, as lbagent's reload would leave it.
            with open(os.path.join(BASELINE_HOME, "global.cfg")) as f:
                text = f.read().replace("@STATE@", self.state)
            text += (f"\nfrontend fe_{fe}\n    bind 127.0.0.1:{fe}\n    default_backend be_{fe}\n"
                     f"\nbackend be_{fe}\n    balance roundrobin\n    retries 3\n"
                     f"    option redispatch 1\n    server node-a {ip}:{self.node_port} check\n")
            cfg = os.path.join(self.state, "haproxy.cfg")
            with open(cfg, "w") as f:
                f.write(text)
            subprocess.run([self.haproxy_bin, "-D", "-p", os.path.join(self.state, "haproxy.pid"),
                            "-f", cfg], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            self.haproxy = True
            self.client.ready()
            return
        self.client.send(f"set server be_{fe}/node-a addr {ip} port {self.node_port}\n")

    def finish_update(self):
        return self.client.finish()

    def wait_idle(self, timeout=30):
        pass

    def failed_runs(self):
        return 0

    def stop(self):
        self.client.close()
        kill_naming(self.state)


class RequestSocket:
    """What both request clients share: one socket, and when its answer was first seen."""

    sock = None
    answered = None

    def note_answer(self):
        """Records when the answer's first bytes are readable (a non-blocking look)."""
        if self.answered is None and self.sock is not None:
            if select.select([self.sock], [], [], 0)[0]:
                self.answered = time.monotonic()

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class CommandClient(RequestSocket):
    """One runtime API command per connection to HAProxy's admin socket (HAProxy answers, then
    closes): the same send / note_answer / finish shape as UpdateClient."""

    def __init__(self, path):
        self.path = path
        self.sock = None
        self.sent_at = None
        self.answered = None
        self.created = False

    def ready(self):
        """After the first update, which starts HAProxy: answered at once."""
        wait_until("the admin socket", lambda: os.path.exists(self.path), 10)
        self.sent_at = self.answered = time.monotonic()
        self.created = True

    def send(self, line):
        self.created = False
        self.answered = None
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(self.path)
        self.sent_at = time.monotonic()
        self.sock.sendall(line.encode())

    def finish(self):
        """(status, time the answer was first seen): 200 when HAProxy took the address."""
        if self.created:
            return 200, self.answered
        buf = b""
        try:
            while True:
                d = self.sock.recv(4096)
                if not d:
                    break
                buf += d
        except OSError:
            pass
        if self.answered is None:
            self.answered = time.monotonic()
        self.close()
        ok = buf.startswith(b"IP changed from") or buf.startswith(b"no need to change")
        return (200 if ok else 500), self.answered


class UpdateClient(RequestSocket):
    """The update requests of one system, over one kept-alive HTTP/1.1 connection on a raw
    socket: the same few syscalls for the webhook and for lbagent, and no http.client (whose
    header parsing alone costs more than lbagent's whole change). A request is sent, then its
    answer is read later, so the frontend can be polled while the request is in flight."""

    def __init__(self, port):
        self.port = port
        self.sock = None
        self.request = None
        self.answered = None
        self.sent_at = None

    def send(self, method, path, body, headers):
        head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}",
                f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        self.answered = None
        # "Request sent": the request is built and signed, its bytes go out now.
        self.sent_at = time.monotonic()
        self._write()

    def _write(self):
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(self.request)

    def finish(self):
        """(status, body, time the answer was first seen); status 0 when none came."""
        for attempt in (0, 1):
            try:
                status, body = self._read()
                if self.answered is None:
                    self.answered = time.monotonic()
                return status, body, self.answered
            except (OSError, ValueError):
                self.close()
                if attempt:
                    break
                # Closed with nothing answered (an idle keep-alive the server dropped): the
                # request never ran; send it once more on a fresh connection.
                try:
                    self._write()
                except OSError:
                    break
        return 0, b"", time.monotonic()

    def _read(self):
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = self.sock.recv(65536)
            if not d:
                raise ConnectionError("closed before the answer")
            buf += d
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        if "content-length" in fields:
            n = int(fields["content-length"])
            while len(rest) < n:
                d = self.sock.recv(65536)
                if not d:
                    raise ConnectionError("closed inside the answer")
                rest += d
            if fields.get("connection", "").lower() == "close":
                self.close()
            return status, rest[:n]
        # No length: the body runs to the close.
        while True:
            d = self.sock.recv(65536)
            if not d:
                break
            rest += d
        self.close()
        return status, rest


def pids_naming(text, comm=None, serving=False):
    """Processes whose command line contains `text` (our own temp dir): started by this bench.
    `serving` leaves out `haproxy -c` checks."""
    found = []
    needle = text.encode()
    for pid, (_, c, _) in proc_table().items():
        if pid == os.getpid() or (comm is not None and c != comm):
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if needle in cmd and not (serving and b"-c" in cmd.split(b"\0")):
            found.append(pid)
    return found


def kill_naming(text):
    for pid in pids_naming(text):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# ---------------------------------------------------------------- one system's run


def pct(values, p):
    s = sorted(values)
    return s[max(0, math.ceil(p * len(s)) - 1)]


def run_system(system, args):
    log(f"{system.label}: starting")
    sampler = None
    load = hold = None
    res = {"label": system.label, "kind": system.kind}
    try:
        system.start()
        sampler = Helper(sample_main, system.root_pid())
        fe = free_port()

        # The frontend, routed to node A: not measured.
        status = update(system, fe, NODE_A)
        if status != 200:
            raise BenchError(f"{system.label}: creating the frontend answered {status}")
        system.wait_idle()
        if wait_for_answer(fe, NODE_A, 20) is None:
            raise BenchError(f"{system.label}: the frontend never served {NODE_A}")

        # Idle: the control plane's own process alone (a background `haproxy -c` may be running).
        res["rss_idle"] = proc_table()[system.root_pid()][2] * PAGE_KIB
        ctx = mp.get_context("fork")
        connected = ctx.Value("i", 0)
        hold = Helper(hold_main, fe, args.hold, connected)
        wait_until("the long-lived connections", lambda: connected.value >= args.hold, 15)
        load = Helper(load_main, fe, args.rate, 4)
        time.sleep(0.5)  # load pacing: let the client load run steadily before the changes

        lat, seen_lat, answer, bad = [], [], [], 0
        ip = NODE_A
        hist0 = system.apply_histogram() if isinstance(system, Lbagent) else None
        t0 = time.monotonic()
        for i in range(args.changes):
            ip = NODE_B if ip == NODE_A else NODE_A
            # The frontend is polled from the moment the request is sent, while it is in flight:
            # the webhook answers before its script runs, lbagent after HAProxy took the change,
            # and either way the latency ends when traffic reaches the new address. No garbage
            # collection in this process inside the window: it would pause the probes.
            gc.disable()
            system.send_update(fe, ip)
            t = system.client.sent_at
            got = wait_for_answer(fe, ip, 20, system.client)
            status, answered = system.finish_update()
            gc.enable()
            answer.append(answered - t)
            if status != 200:
                bad += 1
            if got is None:
                raise BenchError(f"{system.label}: change {i + 1} to {ip} never served")
            seen, accepted = got
            lat.append(accepted - t)
            seen_lat.append(seen - t)
            system.wait_idle()
            time.sleep(args.gap)  # load pacing between changes
        t1 = time.monotonic()
        if hist0:
            (b0, s0), (b1, s1) = hist0, system.apply_histogram()
            res["apply_hist"] = ({le: b1[le] - b0.get(le, 0) for le in b1}, s1 - s0)
        res["serving_after_changes"] = system.serving_processes()
        res["failed_runs_changes"] = system.failed_runs()

        # The burst: BURST changes back to back.
        tb = time.monotonic()
        for i in range(args.burst):
            ip = NODE_B if ip == NODE_A else NODE_A
            status = update(system, fe, ip)
            if status != 200:
                bad += 1
        try:
            system.wait_idle(60)
            idle = True
        except BenchError:
            idle = False
        seen = wait_for_answer(fe, ip, 10)
        tb1 = time.monotonic()
        last = []
        for _ in range(20):
            try:
                last.append(probe(fe))
            except OSError as e:
                last.append(type(e).__name__)
        res["burst_rate"] = args.burst / (seen[0] - tb) if (seen and idle) else None
        res["burst_ends_right"] = all(x == ip for x in last)
        res["burst_last"] = sorted(set(last))
        res["failed_runs"] = system.failed_runs()
        time.sleep(args.gap)  # load pacing: the client load runs on after the burst
        tb2 = time.monotonic()

        loads = load.finish()
        load = None
        cuts = hold.finish()
        hold = None
        samples = sampler.finish()
        sampler = None

        def window(a, b):
            rows = [x for x in loads if a <= x[0] <= b]
            return sum(1 for x in rows if not x[1]), len(rows), sorted({x[2] for x in rows if not x[1]})

        res["lat"] = lat
        res["seen_lat"] = seen_lat
        res["answer"] = answer
        res["bad_status"] = bad
        res["fail"], res["load_n"], res["fail_kinds"] = window(t0, t1)
        res["burst_fail"], res["burst_n"], _ = window(tb, tb2)
        res["cuts"] = sum(1 for c in cuts if t0 <= c[0] <= t1)
        res["rss_peak"] = max(k for _, k in samples) if samples else 0
        res["serving_end"] = system.serving_processes()
        if isinstance(system, Lbagent):
            res["applied"] = dict(system.applied)
        if os.environ.get("COMPARE_DEBUG"):
            log(f"{system.label}: latencies ms " + " ".join(f"{x * 1000:.1f}" for x in lat))
            log(f"{system.label}: seen by the client ms " + " ".join(f"{x * 1000:.1f}" for x in seen_lat))
            log(f"{system.label}: answers ms " + " ".join(f"{x * 1000:.1f}" for x in answer))
        log(f"{system.label}: done ({t1 - t0:.1f} s of changes, burst {tb1 - tb:.2f} s)")
        return res
    finally:
        for h in (load, hold, sampler):
            if h is not None:
                try:
                    h.finish(3)
                except Exception:  # noqa: BLE001
                    pass
        system.stop()


# ---------------------------------------------------------------- table


def fmt_ms(s):
    ms = s * 1000
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def print_table(results, args):
    cols = [r["label"] for r in results]
    rows = []

    def row(name, f, target=""):
        rows.append([name] + [f(r) for r in results] + [target])

    n = args.changes
    of = f"of {n}{', = the max' if n < 100 else ''}"
    row("update latency p50 (ms): sent → the new address accepts a connection",
        lambda r: fmt_ms(pct(r["lat"], 0.50)))
    row(f"update latency p99 (ms; {of})", lambda r: fmt_ms(pct(r["lat"], 0.99)))
    lb = next((r for r in results if r["kind"] == "lbagent"), None)
    floor = next((r for r in results if r["kind"] == "floor"), None)

    def ratios(key):
        return lambda r: "" if r["kind"] != "baseline" else (
            f"{pct(r[key], 0.50) / pct(lb[key], 0.50):.0f}×, "
            f"{pct(r[key], 0.99) / pct(lb[key], 0.99):.0f}×")

    if lb:
        row("baseline ÷ lbagent: p50, p99", ratios("lat"), "p99 ≥ 50×")
    if lb and floor:
        row("lbagent above the floor: p50, p99 (ms)", lambda r: "" if r is not lb else (
            f"{fmt_ms(pct(lb['lat'], 0.50) - pct(floor['lat'], 0.50))}, "
            f"{fmt_ms(pct(lb['lat'], 0.99) - pct(floor['lat'], 0.99))}"))
    row("the same, seen by the client: p50 / p99 (ms; the probe's answer read back)",
        lambda r: f"{fmt_ms(pct(r['seen_lat'], 0.50))} / {fmt_ms(pct(r['seen_lat'], 0.99))}")
    if lb:
        row("baseline ÷ lbagent, seen by the client: p50, p99", ratios("seen_lat"))
    row("answer p50 (ms; HTTP, or the socket's for the floor)",
        lambda r: fmt_ms(pct(r["answer"], 0.50)))

    def in_agent(r):
        if "apply_hist" not in r:
            return ""
        buckets, total = r["apply_hist"]
        n = buckets.get(math.inf, 0)
        if not n:
            return "?"
        p99 = min(le for le, c in buckets.items() if c >= math.ceil(0.99 * n))
        return f"mean {total / n * 1000:.2f}, p99 ≤ {p99 * 1000:.1f}"

    row("time inside lbagent per change (ms; its /metrics histogram)", in_agent)
    row(f"updates/s (burst of {args.burst}, until all applied and serving the last)",
        lambda r: f"{r['burst_rate']:.0f}" if r["burst_rate"] else "— (never served the last)")
    row("burst ends on the last address",
        lambda r: "yes" if r["burst_ends_right"] else "no: " + "/".join(r["burst_last"]))
    row("script runs that failed: in the changes / in the burst",
        lambda r: "n/a" if r["kind"] != "baseline"
        else f"{r['failed_runs_changes']} / {r['failed_runs'] - r['failed_runs_changes']}")
    row(f"failed client requests during {n} changes ({args.rate}/s load)",
        lambda r: f"{r['fail']} of {r['load_n']}" + (f" ({', '.join(r['fail_kinds'])})" if r["fail"] else ""),
        "lbagent 0")
    row(f"failed client requests during the burst", lambda r: f"{r['burst_fail']} of {r['burst_n']}")
    row(f"long-lived connections cut ({args.hold} held; total over {n} changes)",
        lambda r: f"{r['cuts']} ({r['cuts'] / n:.1f}/change)", "lbagent 0")
    row("update requests not answered 200", lambda r: str(r["bad_status"]))
    row("control plane RSS idle (MiB)",
        lambda r: "—" if r["kind"] == "floor" else f"{r['rss_idle'] / 1024:.1f}")
    row("control plane RSS peak (MiB)",
        lambda r: "—" if r["kind"] == "floor" else f"{r['rss_peak'] / 1024:.1f}")
    row("HAProxy processes after the changes / at the end",
        lambda r: f"{r['serving_after_changes']} / {r['serving_end']}")

    head = ["measure"] + cols + ["target"]
    print("| " + " | ".join(head) + " |")
    print("| --- |" + " ---: |" * len(cols) + " --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if lb:
        print(f"\nlbagent answers: {lb.get('applied')}")
        ok_fail = lb["fail"] == 0
        ok_cut = lb["cuts"] == 0
        ratios = [pct(r["lat"], 0.99) / pct(lb["lat"], 0.99)
                  for r in results if r["kind"] == "baseline"]
        print(f"targets: lbagent failed requests 0: {'met' if ok_fail else 'MISSED'}; "
              f"cut connections 0: {'met' if ok_cut else 'MISSED'}; "
              f"p99 ≥ 50× below each baseline: "
              f"{'n/a' if not ratios else 'met' if min(ratios) >= 50 else 'MISSED'} "
              f"({', '.join(f'{x:.0f}×' for x in ratios)})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=100, help="address changes per system (100)")
    ap.add_argument("--hold", type=int, default=20, help="long-lived connections held (20)")
    ap.add_argument("--rate", type=int, default=200, help="client load, connections/s (200)")
    ap.add_argument("--burst", type=int, default=20, help="changes in the burst (20)")
    ap.add_argument("--gap", type=float, default=0.3, help="pause between changes, s (0.3)")
    ap.add_argument("--only", default="A,B,L,F",
                    help="systems to run: A,B,L,F (F: the floor, the command alone)")
    args = ap.parse_args()

    tmp = os.environ["BENCH_TMP"]
    lbagent = os.environ["LBAGENT"]
    # The HAProxy under test, as for the tests: $LBAGENT_TEST_HAPROXY, else the machine's.
    haproxy_bin = os.environ.get("LBAGENT_TEST_HAPROXY") or shutil.which("haproxy") or "/usr/sbin/haproxy"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    ctx = mp.get_context("fork")
    port = node_port()
    ready = ctx.Event()
    echo = ctx.Process(target=echo_main, args=(port, ready), daemon=True)
    echo.start()
    try:
        if not ready.wait(10):
            raise BenchError("the echo nodes did not start")
        uname = os.uname()
        log(f"nodes {NODE_A}:{port} and {NODE_B}:{port}; load average {os.getloadavg()[0]:.2f}")
        systems = []
        for key in args.only.split(","):
            if key == "A":
                systems.append(Baseline("reload", tmp, haproxy_bin, port))
            elif key == "B":
                systems.append(Baseline("restart", tmp, haproxy_bin, port))
            elif key == "L":
                systems.append(Lbagent(lbagent, tmp, haproxy_bin, port))
            elif key == "F":
                systems.append(Direct(tmp, haproxy_bin, port))
        load_before = os.getloadavg()[0]
        t = time.monotonic()
        results = [run_system(s, args) for s in systems]
        took = time.monotonic() - t
        hv = subprocess.run([haproxy_bin, "-v"], capture_output=True, text=True).stdout.split("\n")[0]
        print(f"\n{len(systems)} systems in {took:.0f} s; {os.cpu_count()} CPUs, {uname.sysname} "
              f"{uname.release}; {hv.split(' - ')[0]}; load average {load_before:.2f} → "
              f"{os.getloadavg()[0]:.2f}\n")
        print_table(results, args)
    except BenchError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 1
    finally:
        echo.kill()
        echo.join(3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
