"""Resumable relay ("EAR1") between EICE tunnels and the box's own sshd.

Why: an EC2 Instance Connect Endpoint closes every tunnel at its maximum duration (1 h), and the
SSH connection over it died with it. This relay runs on the box (systemd unit
ephemeral-admin-resume.service, only for connect = "eice"), listens on 127.0.0.1:2022 only and
holds the TCP connection to sshd. The endpoint reaches nothing but sshd (port 22; AWS's endpoint
tunnels to ports 22 and 3389 only), so each tunnel carries a short-lived outer SSH connection
whose one exec channel runs this script with --attach, a plain stdin/stdout <-> relay pipe; the
client's real SSH connection runs inside. When a tunnel ends, the client opens a new one and
resumes the same byte stream by token, sequence totals and retransmission of unacked bytes, so
the end-to-end encrypted SSH connection inside never notices.

Wire protocol (big-endian), one TCP connection = one tunnel:
  HELLO   client -> relay: b"EAR1" + 16-byte token + u64 have (relay->client bytes it received)
  WELCOME relay -> client: b"EAR1" + u8 status + u64 have (client->relay bytes passed to sshd);
          status 0 NEW, 1 RESUMED, 2 REFUSED (then u16 length + UTF-8 reason, and the relay closes)
  then both sides retransmit what the peer lacks and send frames:
  0x01 DATA u32 len (1..=65536) + bytes | 0x02 ACK u64 total received | 0x03 EOF (stream ended)
Flow control: ACKs share each connection with DATA, so neither side may stop reading its
connection while waiting for the other's ACKs. The relay keeps at most --buffer bytes unacked
towards the client (then it stops reading sshd) and ACKs client bytes once they left its buffer
for sshd's socket; a client that keeps at most --buffer bytes unacked is never stopped (beyond
that the relay waits for sshd, and the client's ACKs may wait behind its data).
A session is dropped when the client sends EOF, when sshd closed and the client acked everything,
or after --detach-timeout seconds without a connection. One log line per event on stderr, with
the token's first 4 bytes only. Python 3.9+, stdlib only (runs as a systemd DynamicUser).
"""
import argparse
import asyncio
import struct
import sys

MAGIC = b"EAR1"
DATA, ACK, EOF = 1, 2, 3
NEW, RESUMED, REFUSED = 0, 1, 2
MAX_DATA = 65536
ACK_EVERY = 64 * 1024
ACK_DELAY = 0.5
HELLO_TIMEOUT = 10.0
LINGER = 5.0


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def data_frames(buf):
    for i in range(0, len(buf), MAX_DATA):
        chunk = bytes(buf[i:i + MAX_DATA])
        yield struct.pack(">BI", DATA, len(chunk)) + chunk


class ProtocolError(Exception):
    pass


class Session:
    """One SSH connection: the sshd socket, unacked output (base = its stream offset), in-total."""

    def __init__(self, relay, token, sshd_r, sshd_w):
        self.relay, self.token, self.tag = relay, token, token[:4].hex()
        self.sshd_r, self.sshd_w = sshd_r, sshd_w
        self.out, self.base = bytearray(), 0
        self.in_total = self.acked_sent = 0
        self.sshd_eof = self.closed = False
        self.conn = None
        self.space, self.drain_lock = asyncio.Event(), asyncio.Lock()
        self.ack_timer = self.detach_timer = None
        self.pump_task = asyncio.ensure_future(self.pump())

    async def pump(self):
        """sshd -> client: buffer until acked; stop reading while the buffer is full."""
        try:
            while True:
                while len(self.out) >= self.relay.buffer:
                    self.space.clear()
                    await self.space.wait()
                data = await self.sshd_r.read(MAX_DATA)
                if not data:
                    break
                self.out += data
                self.send(struct.pack(">BI", DATA, len(data)) + data)
        except OSError:
            pass
        self.sshd_eof = True
        log(f"{self.tag} sshd closed ({self.base + len(self.out)} bytes out)")
        self.send(bytes([EOF]))
        self.maybe_finish()

    def send(self, frame):
        if self.conn and not self.closed and not self.conn.is_closing():
            self.conn.write(frame)

    def attach(self, w, status, have):
        """WELCOME, then retransmit every byte after the client's have (and EOF if sshd ended)."""
        if self.conn is not None:
            log(f"{self.tag} taken over by a new connection")
            self.conn.transport.abort()
        if self.detach_timer:
            self.detach_timer.cancel()
            self.detach_timer = None
        self.conn = w
        self.ack(have)
        w.write(MAGIC + struct.pack(">BQ", status, self.in_total))
        self.acked_sent = self.in_total
        for frame in data_frames(self.out):
            w.write(frame)
        if self.sshd_eof:
            w.write(bytes([EOF]))
        self.maybe_finish()

    def detach(self, why):
        self.conn = None
        log(f"{self.tag} detached ({why})")
        timeout = self.relay.detach_timeout
        self.detach_timer = asyncio.get_running_loop().call_later(
            timeout, self.close, f"detached for {timeout:g} s")

    def ack(self, total):
        """The client has every output byte up to total: drop them from the buffer."""
        if not self.base <= total <= self.base + len(self.out):
            raise ProtocolError(f"ack {total} outside {self.base}..{self.base + len(self.out)}")
        del self.out[:total - self.base]
        self.base = total
        if len(self.out) < self.relay.buffer:
            self.space.set()

    def to_sshd(self, data):
        if not self.sshd_w.is_closing():
            self.sshd_w.write(data)
        self.in_total += len(data)
        if self.handed() - self.acked_sent >= ACK_EVERY:
            self.send_ack()
        self.ack_later()

    def handed(self):
        """Client bytes that left our buffer for sshd's socket: what we ACK. A client keeping its
        unacked bytes under --buffer thus never makes us stop reading its connection, so its
        ACKs of our output always get through (they share that connection with its data)."""
        if self.sshd_w.is_closing():
            return self.in_total
        return self.in_total - self.sshd_w.transport.get_write_buffer_size()

    def ack_later(self):
        if self.ack_timer is None and self.in_total > self.acked_sent and not self.closed:
            self.ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY, self.ack_tick)

    def ack_tick(self):
        self.ack_timer = None
        self.send_ack()
        self.ack_later()  # while sshd has not taken everything yet

    def send_ack(self):
        handed = self.handed()
        if self.conn and handed > self.acked_sent:
            self.send(struct.pack(">BQ", ACK, handed))
            self.acked_sent = handed

    def maybe_finish(self):
        if self.sshd_eof and not self.out and not self.closed:
            self.close("sshd closed, client has everything")

    def close(self, why):
        if self.closed:
            return
        self.closed = True
        self.relay.sessions.pop(self.token, None)
        for timer in (self.ack_timer, self.detach_timer):
            if timer:
                timer.cancel()
        self.pump_task.cancel()
        self.sshd_w.close()
        if self.conn and not self.conn.is_closing():
            try:
                self.conn.write_eof()  # the client sees the end; its handler lingers, then closes
            except OSError:
                pass
        log(f"{self.tag} closed ({why}; {self.in_total} bytes in, {self.base + len(self.out)} out)")


class Relay:
    def __init__(self, args):
        self.to = args.to
        self.detach_timeout, self.max_sessions, self.buffer = (
            args.detach_timeout, args.max_sessions, args.buffer)
        self.sessions = {}

    async def handle(self, r, w):
        peer = w.get_extra_info("peername")
        try:
            hello = await asyncio.wait_for(r.readexactly(28), HELLO_TIMEOUT)
            if hello[:4] != MAGIC:
                log(f"connection from {peer}: wrong magic, closed")
                return
            token, have = hello[4:20], struct.unpack(">Q", hello[20:])[0]
            s = self.sessions.get(token)
            if s is None:
                s = await self.new_session(token, have, w)
                if s is None:
                    return
                status = NEW
            elif not s.base <= have <= s.base + len(s.out):
                return refuse(w, token, f"have {have} outside the buffered "
                              f"{s.base}..{s.base + len(s.out)}")
            else:
                status = RESUMED
                log(f"{s.tag} resumed from {peer} (client has {have}, relay has {s.in_total})")
            s.attach(w, status, have)
            await self.frames(s, r, w)
        except asyncio.TimeoutError:
            log(f"connection from {peer}: no complete HELLO in {HELLO_TIMEOUT:g} s, closed")
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            w.close()

    async def new_session(self, token, have, w):
        tag = token[:4].hex()
        if have:
            return refuse(w, token, f"unknown session (client has {have} bytes)")
        if len(self.sessions) >= self.max_sessions:
            return refuse(w, token, f"too many sessions ({self.max_sessions})")
        try:
            sr, sw = await asyncio.open_connection(*self.to)
        except OSError as e:
            return refuse(w, token, f"sshd unreachable: {e}")
        if token in self.sessions:  # a twin HELLO won the race while we connected
            sw.close()
            return refuse(w, token, "session started by another connection")
        s = self.sessions[token] = Session(self, token, sr, sw)
        log(f"{tag} new from {w.get_extra_info('peername')}")
        return s

    async def frames(self, s, r, w):
        """Frames from the client until its connection ends, is taken over or the session ends."""
        why = "connection closed"
        try:
            while not s.closed:
                kind = (await r.readexactly(1))[0]
                if kind == DATA:
                    n = struct.unpack(">I", await r.readexactly(4))[0]
                    if not 1 <= n <= MAX_DATA:
                        raise ProtocolError(f"DATA length {n}")
                    arg = await r.readexactly(n)
                elif kind == ACK:
                    arg = struct.unpack(">Q", await r.readexactly(8))[0]
                elif kind != EOF:
                    raise ProtocolError(f"frame type {kind}")
                if s.conn is not w:
                    return  # taken over: the new connection carries the stream
                if s.closed:
                    break
                if kind == DATA:
                    s.to_sshd(arg)
                    if s.in_total - s.handed() > self.buffer:  # the client ignores our ACKs
                        async with s.drain_lock:  # one drain at a time (python < 3.10 asserts)
                            try:
                                await s.sshd_w.drain()
                            except OSError:
                                pass  # sshd went away: the pump sees it and sends EOF
                elif kind == ACK:
                    s.ack(arg)
                    s.maybe_finish()
                else:
                    s.close("client sent EOF")
            # Ended: read what the client still sends until it closes, so our close sends no RST.
            await asyncio.wait_for(r.read(), LINGER)
        except ProtocolError as e:
            why = f"protocol error: {e}"
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
            pass
        finally:
            if s.conn is w and not s.closed:
                s.detach(why)


def refuse(w, token, reason):
    log(f"{token[:4].hex()} refused: {reason}")
    msg = reason.encode()[:1000]
    w.write(MAGIC + struct.pack(">BH", REFUSED, len(msg)) + msg)
    return None


def hostport(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def attach(address):
    """--attach: stdin to the relay and the relay to stdout, until either ends (what an outer SSH
    connection's exec channel runs). Exits 2 when nothing listens there."""
    import os
    import socket
    import threading
    try:
        sock = socket.create_connection(address, timeout=10)
    except OSError as e:
        log(f"no resume relay at {address[0]}:{address[1]}: {e}")
        return 2
    sock.settimeout(None)

    def up():
        while True:
            data = os.read(0, 65536)
            if not data:
                break
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    threading.Thread(target=up, daemon=True).start()
    while True:
        data = sock.recv(65536)
        if not data:
            return 0
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attach", type=hostport, metavar="HOST:PORT",
                   help="pipe stdin/stdout to the relay at HOST:PORT and exit")
    p.add_argument("--listen", type=hostport, help="HOST:PORT to listen on")
    p.add_argument("--to", type=hostport, help="HOST:PORT of sshd")
    p.add_argument("--detach-timeout", type=float, default=120.0, metavar="SECONDS")
    p.add_argument("--max-sessions", type=int, default=64, metavar="N")
    p.add_argument("--buffer", type=int, default=4 << 20, metavar="BYTES")
    args = p.parse_args()
    if args.attach:
        try:
            sys.exit(attach(args.attach))
        except (BrokenPipeError, ConnectionError):
            sys.exit(0)  # either side went away: the tunnel's end
    if not (args.listen and args.to):
        p.error("--listen and --to are required (or --attach)")
    relay = Relay(args)
    server = await asyncio.start_server(relay.handle, *args.listen)
    host, port = server.sockets[0].getsockname()[:2]
    log(f"listening on {host}:{port}, relaying to {args.to[0]}:{args.to[1]}")
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
