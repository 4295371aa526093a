#!/usr/bin/env python3
"""Self-test of the box-side resume relay (src/userdata/resume.py, wire protocol "EAR1").

    python3 tests/support/localcloud/resume_selftest.py [--python PYTHON]

Runs resume.py as a subprocess (with PYTHON, default this interpreter; it must work on 3.9+)
between an asyncio test client written from the protocol (resume.py's docstring) and an
in-process "sshd stand-in" TCP server on 127.0.0.1 that echoes or sends then closes. Checks: a new stream both ways; 8 MiB each way with 3 mid-transfer drops
(unacked bytes both ways) resumed with no byte lost or duplicated; a refused unknown token; a wrong
magic; a detached session dropped after --detach-timeout; sshd's EOF after all data; a takeover
by a second HELLO; the client's EOF; an unknown frame type; --attach (the stdin/stdout pipe an
outer SSH connection's exec runs); the log never holds a whole token.
"""

import argparse
import asyncio
import fcntl
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RELAY = os.path.abspath(os.path.join(HERE, "..", "..", "..", "src", "userdata", "resume.py"))
MAGIC = b"EAR1"
DATA, ACK, EOF = 1, 2, 3
NEW, RESUMED, REFUSED = 0, 1, 2
DETACH_TIMEOUT = 1.5
BUFFER = 256 * 1024  # small: the drops in t_resume_big hit the relay's backpressure


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def small_socket():
    sock = socket.socket()
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, 32 * 1024)
    return sock


class Sshd:
    """The sshd stand-in: per connection, 'echo' (and record) or 'blob' (send, then close)."""

    def __init__(self):
        self.mode, self.blob, self.conns = "echo", b"", []

    async def start(self):
        sock = small_socket()  # little kernel buffering: backpressure reaches the relay quickly
        sock.bind(("127.0.0.1", 0))
        self.server = await asyncio.start_server(self.handle, sock=sock)
        return self.server.sockets[0].getsockname()[1]

    async def handle(self, r, w):
        conn = {"got": bytearray(), "eof": asyncio.Event()}
        self.conns.append(conn)
        try:
            if self.mode == "blob":
                w.write(self.blob)
                await w.drain()
                w.close()
                return
            while True:
                data = await r.read(65536)
                if not data:
                    break
                conn["got"] += data
                w.write(data)
                await w.drain()
        except OSError:
            pass
        finally:
            conn["eof"].set()
            w.close()


class Client:
    """A test client: the spec's client side, with its whole output kept for retransmission."""

    def __init__(self, port, token=None, window=BUFFER):
        self.port, self.token, self.window = port, token or os.urandom(16), window
        self.recv, self.out, self.pos = bytearray(), bytearray(), 0
        self.peer_acked, self.eof, self.r, self.w, self.reader = 0, False, None, None, None

    async def hello(self, have=None):
        """HELLO; returns (status, relay have) or (REFUSED, reason) after checking the close."""
        sock = small_socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        r, w = await asyncio.open_connection(sock=sock)
        have = len(self.recv) if have is None else have
        w.write(MAGIC + self.token + struct.pack(">Q", have))
        head = await asyncio.wait_for(r.readexactly(5), 5)
        check(head[:4] == MAGIC, f"WELCOME magic {head[:4]!r}")
        if head[4] == REFUSED:
            n = struct.unpack(">H", await r.readexactly(2))[0]
            reason = (await r.readexactly(n)).decode()
            check(await asyncio.wait_for(r.read(), 5) == b"", "relay did not close after REFUSED")
            w.close()
            return REFUSED, reason
        relay_have = struct.unpack(">Q", await r.readexactly(8))[0]
        check(self.peer_acked <= relay_have <= len(self.out),
              f"relay have {relay_have} outside acked {self.peer_acked}..sent {len(self.out)}")
        self.peer_acked, self.pos, self.r, self.w = relay_have, relay_have, r, w
        self.reader = asyncio.ensure_future(self.read_frames(r, w))
        await self.flush()  # retransmit what the relay lacks
        return head[4], relay_have

    async def read_frames(self, r, w):
        """Frames from the relay; ACKs every 64 KiB, and (acker task) within 0.2 s."""
        self.last_ack = len(self.recv)

        def ack():
            if len(self.recv) > self.last_ack:
                w.write(struct.pack(">BQ", ACK, len(self.recv)))
                self.last_ack = len(self.recv)

        async def acker():
            while True:
                await asyncio.sleep(0.2)
                ack()

        acking = asyncio.ensure_future(acker())
        try:
            while True:
                kind = (await r.readexactly(1))[0]
                if kind == DATA:
                    n = struct.unpack(">I", await r.readexactly(4))[0]
                    check(1 <= n <= 65536, f"DATA length {n}")
                    self.recv += await r.readexactly(n)
                    if len(self.recv) - self.last_ack >= 65536:
                        ack()
                elif kind == ACK:
                    total = struct.unpack(">Q", await r.readexactly(8))[0]
                    check(self.peer_acked <= total <= len(self.out), f"relay ACK {total} out of range")
                    self.peer_acked = total
                elif kind == EOF:
                    self.eof = True
                    ack()
                else:
                    raise AssertionError(f"frame type {kind} from the relay")
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            acking.cancel()

    async def send(self, data):
        self.out += data
        await self.flush()

    async def flush(self):
        """Send what the relay lacks, keeping at most window bytes unacked (at most the relay's
        --buffer, as a client must)."""
        while self.pos < len(self.out):
            while self.pos - self.peer_acked >= self.window:
                await asyncio.sleep(0.005)
            chunk = self.out[self.pos:self.pos + random.choice((1000, 65536, 40000))]
            self.w.write(struct.pack(">BI", DATA, len(chunk)) + chunk)
            self.pos += len(chunk)
            await self.w.drain()

    def unread(self):
        """Bytes the relay sent on this connection that the client will never read."""
        n = struct.unpack("i", fcntl.ioctl(self.w.get_extra_info("socket").fileno(),
                                             termios.FIONREAD, b"\0\0\0\0"))[0]
        return n + len(self.r._buffer)

    async def drop(self, data=b""):
        """Stop reading and acking, push data ignoring the relay's ACKs (its --buffer fills, then
        its reads from us stop), then drop the TCP connection (RST): bytes are lost both ways."""
        self.reader.cancel()
        try:
            await self.reader
        except asyncio.CancelledError:
            pass
        self.out += data
        while self.pos < len(self.out):
            chunk = self.out[self.pos:self.pos + 65536]
            self.w.write(struct.pack(">BI", DATA, len(chunk)) + chunk)
            self.pos += len(chunk)
        await asyncio.sleep(0.3)
        unread, unacked = self.unread(), self.pos - self.peer_acked
        self.w.transport.abort()
        await asyncio.sleep(0.05)
        return unread, unacked

    async def wait(self, cond, what, timeout=20, detail=lambda: ""):
        deadline = time.monotonic() + timeout
        while not cond():
            check(time.monotonic() < deadline, f"timed out waiting for {what} {detail()}")
            await asyncio.sleep(0.02)


async def raw(port, payload):
    """Send raw bytes, return everything the relay sends until it closes."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(payload)
    try:
        return await asyncio.wait_for(r.read(), 12)
    finally:
        w.close()


async def t_new_stream(port, sshd):
    c = Client(port)
    check(await c.hello() == (NEW, 0), "first HELLO is NEW with have 0")
    await c.send(b"hello sshd")
    await c.wait(lambda: c.recv == b"hello sshd", "echo")
    await c.wait(lambda: c.peer_acked == 10, "relay ACK within 0.5 s")
    check(sshd.conns[-1]["got"] == b"hello sshd", "sshd got the bytes")
    c.w.close()


async def t_resume_big(port, sshd, size=8 << 20, drops=3):
    rnd = random.Random(17)
    payload = rnd.randbytes(size) if hasattr(rnd, "randbytes") else os.urandom(size)
    c = Client(port)
    check((await c.hello())[0] == NEW, "NEW")
    conn = sshd.conns[-1]
    step, seen = size // (drops + 1), []
    for i in range(drops):
        unread, unacked = await c.drop(payload[i * step:(i + 1) * step])
        status, relay_have = await c.hello()  # retransmits what the relay lacks
        check(status == RESUMED, f"drop {i}: RESUMED, got {status}")
        seen.append((unread, unacked, (i + 1) * step - relay_have))
    await c.send(payload[drops * step:])
    await c.wait(lambda: len(c.recv) >= size, f"{size} bytes echoed back", 60,
                 lambda: f"got {len(c.recv)}, sent {c.pos}, acked {c.peer_acked}, sshd got {len(conn['got'])}")
    check(bytes(conn["got"]) == payload, "sshd got the payload exactly once, in order")
    check(bytes(c.recv) == payload, "the client got the echo exactly once, in order")
    check(len(sshd.conns) == 1 or sshd.conns[-1] is conn, "resumes reuse one sshd connection")
    check(any(u > 0 for u, _, _ in seen), f"some drop lost relay->client bytes: {seen}")
    check(any(a > 0 for _, a, _ in seen), f"some drop had unacked client->relay bytes: {seen}")
    check(any(x > 0 for _, _, x in seen), f"some drop lost client->relay bytes: {seen}")
    log(f"  drops (unread by the client, unacked by the relay, retransmitted by the client): {seen}")
    c.w.close()


async def t_saturated(port, sshd, size=24 << 20):
    """Both directions full at once, the relay at its default --buffer and the client keeping as
    much unacked: ACKs (behind data on each connection) must still get through."""
    payload = os.urandom(size)
    c = Client(port, window=4 << 20)
    await c.hello()
    conn = sshd.conns[-1]
    await c.send(payload)
    await c.wait(lambda: len(c.recv) >= size, f"{size} bytes echoed back", 60,
                 lambda: f"got {len(c.recv)}, sent {c.pos}, acked {c.peer_acked}, sshd got {len(conn['got'])}")
    check(bytes(conn["got"]) == payload and bytes(c.recv) == payload, "both ways intact")
    c.w.close()


async def t_refused_unknown(port):
    c = Client(port)
    status, reason = await c.hello(have=5)
    check(status == REFUSED and reason, f"unknown token with have 5: REFUSED with a reason ({reason!r})")


async def t_wrong_magic(port):
    check(await raw(port, b"SSH-2.0-x\r\n" + bytes(20)) == b"", "wrong magic: closed, no WELCOME")


async def t_detach_timeout(port, sshd):
    c = Client(port)
    await c.hello()
    await c.send(b"x" * 100)
    await c.wait(lambda: len(c.recv) == 100, "echo")
    conn = sshd.conns[-1]
    await c.drop()
    await asyncio.wait_for(conn["eof"].wait(), DETACH_TIMEOUT + 3)  # the relay closed sshd's socket
    status, reason = await c.hello()
    check(status == REFUSED, f"after the detach timeout: REFUSED ({reason!r})")


async def t_sshd_eof(port, sshd):
    sshd.mode, sshd.blob = "blob", os.urandom(3 << 20)
    try:
        c = Client(port)
        await c.hello()
        await c.wait(lambda: c.eof, "EOF frame")
        check(bytes(c.recv) == sshd.blob, "every byte before the EOF frame")
        await asyncio.wait_for(c.reader, 5)  # the relay ends the connection once all is acked
    finally:
        sshd.mode = "echo"
    c.w.close()


async def t_takeover(port, sshd):
    a = Client(port)
    await a.hello()
    await a.send(b"first")
    await a.wait(lambda: a.recv == b"first", "echo on the first connection")
    b = Client(port, a.token)
    b.out, b.recv, b.peer_acked = a.out, bytearray(a.recv), a.peer_acked
    check((await b.hello())[0] == RESUMED, "second HELLO with the token: RESUMED")
    await asyncio.wait_for(a.reader, 5)  # the first connection was dropped
    await b.send(b" second")
    await b.wait(lambda: b.recv == b"first second", "echo on the second connection")
    check(sshd.conns[-1]["got"] == b"first second", "one sshd stream")
    b.w.close()


async def t_client_eof(port, sshd):
    c = Client(port)
    await c.hello()
    await c.send(b"bye")
    c.w.write(bytes([EOF]))
    conn = sshd.conns[-1]
    await asyncio.wait_for(conn["eof"].wait(), 5)
    check(conn["got"] == b"bye", "data before EOF reached sshd")
    status, _ = await Client(port, c.token).hello(have=3)
    check(status == REFUSED, "session forgotten after the client's EOF")


async def t_bad_frame(port, sshd):
    c = Client(port)
    await c.hello()
    await c.send(b"abc")
    await c.wait(lambda: c.recv == b"abc", "echo")
    c.w.write(b"\x09")
    await asyncio.wait_for(c.reader, 5)  # connection closed on a protocol error
    check((await c.hello())[0] == RESUMED, "the session stays (detached)")
    await c.send(b"def")
    await c.wait(lambda: c.recv == b"abcdef", "echo after resume")
    c.w.close()


async def t_attach(python, port, sshd):
    """--attach: what an outer SSH connection's exec runs; a HELLO through its stdin gets the
    WELCOME and the echo back on its stdout, and its stdin's end closes the relay connection
    (the session stays, detached). Nothing listening: exit 2 at once."""
    proc = await asyncio.create_subprocess_exec(python, RELAY, "--attach", f"127.0.0.1:{port}",
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    token = os.urandom(16)
    proc.stdin.write(MAGIC + token + struct.pack(">Q", 0) + struct.pack(">BI", DATA, 5) + b"piped")
    await proc.stdin.drain()
    got = b""
    while b"piped" not in got:
        chunk = await asyncio.wait_for(proc.stdout.read(4096), 10)
        check(chunk, f"the attach pipe answered: {got!r}")
        got += chunk
    check(got[:5] == MAGIC + bytes([NEW]), f"WELCOME NEW through the pipe: {got[:13]!r}")
    proc.stdin.close()
    check(await asyncio.wait_for(proc.wait(), 10) == 0, "stdin's end ends the attach, exit 0")
    c = Client(port, token=token)
    c.out, c.pos = bytearray(b"piped"), 5  # what went through the pipe
    check((await c.hello())[0] == RESUMED, "the session outlives the attach (detached, resumable)")
    c.w.close()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    free = probe.getsockname()[1]
    probe.close()
    nobody = await asyncio.create_subprocess_exec(python, RELAY, "--attach", f"127.0.0.1:{free}",
                                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                  stderr=subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(nobody.communicate(), 20)
    check(nobody.returncode == 2 and out == b"", f"nothing listening: exit 2, no output ({nobody.returncode})")


async def start_relay(python, tmp, name, sshd_port, *flags):
    logpath = os.path.join(tmp, f"{name}.log")
    with open(logpath, "wb") as logf:
        relay = subprocess.Popen([python, RELAY, "--listen", "127.0.0.1:0", "--to", f"127.0.0.1:{sshd_port}",
                                  *flags], stdin=subprocess.DEVNULL, stderr=logf)
    for _ in range(100):
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", open(logpath).read())
        if m:
            return relay, int(m.group(1)), logpath
        await asyncio.sleep(0.05)
    relay.kill()
    raise AssertionError(f"relay did not log 'listening on': {open(logpath).read()}")


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args()
    sshd = Sshd()
    sshd_port = await sshd.start()
    relays = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            relay, port, logpath = await start_relay(args.python, tmp, "relay", sshd_port, "--detach-timeout",
                                                     str(DETACH_TIMEOUT), "--buffer", str(BUFFER))
            relays.append(relay)
            default, default_port, default_log = await start_relay(args.python, tmp, "default", sshd_port)
            relays.append(default)
            tests = [("new stream both ways", t_new_stream(port, sshd), logpath),
                     ("8 MiB each way, 3 drops (backpressure), resumed", t_resume_big(port, sshd), logpath),
                     ("24 MiB each way at once, default --buffer", t_saturated(default_port, sshd), default_log),
                     ("unknown token with have > 0 refused", t_refused_unknown(port), logpath),
                     ("wrong magic closed", t_wrong_magic(port), logpath),
                     ("detached session dropped, then refused", t_detach_timeout(port, sshd), logpath),
                     ("sshd EOF after all data", t_sshd_eof(port, sshd), logpath),
                     ("second HELLO takes over", t_takeover(port, sshd), logpath),
                     ("client EOF closes sshd and forgets", t_client_eof(port, sshd), logpath),
                     ("unknown frame type closes the connection only", t_bad_frame(port, sshd), logpath),
                     ("--attach pipes stdin/stdout to the relay", t_attach(args.python, port, sshd), logpath)]
            for name, coro, relay_log in tests:
                log(f"resume: {name}")
                try:
                    await asyncio.wait_for(coro, 90)
                except BaseException:
                    print(f"relay log:\n{open(relay_log).read()}", file=sys.stderr)
                    for c in tests:
                        c[1].close()
                    raise
            check(relay.poll() is None and default.poll() is None, "relays still running")
        finally:
            for r in relays:
                r.terminate()
                r.wait(10)
            sshd.server.close()
            await asyncio.sleep(0.3)  # the stand-in's connections see the relay's end
        text = open(logpath).read()
        for word in ("new", "resumed", "refused", "detached", "closed"):
            check(re.search(rf"^[0-9a-f]{{8}} {word}", text, re.M), f"log has a '{word}' line")
        check(not re.search(r"[0-9a-f]{32}", text), "the log never holds a whole token")
        check("Traceback" not in text + open(default_log).read(), f"relay log has a traceback:\n{text}")
    log(f"resume self-test: {len(tests)} checks passed (relay on {args.python})")


if __name__ == "__main__":
    asyncio.run(main())
