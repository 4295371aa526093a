"""hostile_sftp: an SFTP v3 server that lies, for a box whose owner is not on our side.

boxsim runs it as a box's ``Subsystem sftp`` when box-config ``{"sftp": "hostile"}`` was set
as the box booted. It speaks enough of SFTP v3 for the CLI's client (INIT, STAT, LSTAT, FSTAT,
REALPATH, OPENDIR, READDIR, OPEN for reading, READ, CLOSE; anything else is refused with
OP_UNSUPPORTED) over stdin/stdout, and serves a fixed tree held in memory, whatever the box's
disk holds. Its directories list what a compromised box could send (OpenSSH's scp
CVE-2019-6111 class): names that climb out (``../escape-dotdot.txt``), hold a ``/``, are empty,
``.`` or ``..`` (with file attributes), hold NUL or terminal escape sequences, are 300 bytes
long or listed twice; a directory of mode 1777 with files of modes 4755 and 2755; a symlink to
``/etc``. A path is looked up literally (only empty and ``.`` components dropped), so a client
that joins a hostile name onto a directory gets that entry's bytes back.

    /evil/dotdot/   ok.txt, ../escape-dotdot.txt
    /evil/slash/    ok.txt, x/, x/../../escape-slash.txt
    /evil/names/    ok.txt, ., .., "", nul<NUL>.txt, x*300, twice (a file, then a directory),
                    a/ (empty) and a/b (a file smuggled into it)
    /evil/esc/      ok.txt, <ESC>]0;pwned<BEL><ESC>[31mred.txt (opening it fails with an
                    escape sequence in the message)
    /evil/modes/    (1777) suid (4755), sgid (2755), world (0666), sticky/ (1777) inner (0644)
    /evil/link/     etc -> /etc (a directory: passwd)
    /evil/plain/    f.txt, sub/x.txt
    /evil/flip/     ok.txt, flip (listed as a file, a directory when opened), flop (listed as a
                    directory, a file when opened)
    /etc/           passwd
"""

import struct
import sys

INIT, VERSION, OPEN, CLOSE, READ, LSTAT, FSTAT = 1, 2, 3, 4, 5, 7, 8
OPENDIR, READDIR, REALPATH, STAT = 11, 12, 16, 17
STATUS, HANDLE, DATA, NAME, ATTRS = 101, 102, 103, 104, 105
OK, EOF, NO_SUCH_FILE, FAILURE, OP_UNSUPPORTED = 0, 1, 2, 4, 8
ESC_NAME = "\x1b]0;pwned\x07\x1b[31mred.txt"
ESC_FAILURE = "\x1b[2J\x1b[31mthe disk is on fire"


def f(mode, data=b"box\n"):
    return ("f", mode, data)


def d(mode, *children):
    return ("d", mode, list(children))


def fails(message):
    return ("x", 0o644, message)


def lie(listed, real):
    """Listed (READDIR, LSTAT) as ``listed``; STAT, OPEN and OPENDIR find ``real``."""
    return ("lie", listed, real)


ETC = d(0o755, ("passwd", f(0o644, b"box-root:x:0:0\n")))
TREE = d(0o755,
    ("etc", ETC),
    ("evil", d(0o755,
        ("dotdot", d(0o755, ("ok.txt", f(0o644, b"ok\n")),
                     ("../escape-dotdot.txt", f(0o644, b"escaped\n")))),
        ("slash", d(0o755, ("ok.txt", f(0o644, b"ok\n")), ("x", d(0o755)),
                    ("x/../../escape-slash.txt", f(0o644, b"escaped\n")))),
        ("names", d(0o755, (".", f(0o644)), ("..", f(0o644)), ("", f(0o644)),
                    ("nul\0.txt", f(0o644)), ("x" * 300, f(0o644)), ("ok.txt", f(0o644, b"ok\n")),
                    ("twice", f(0o644)), ("twice", d(0o755)), ("a", d(0o755)), ("a/b", f(0o644)))),
        ("esc", d(0o755, ("ok.txt", f(0o644, b"ok\n")), (ESC_NAME, fails(ESC_FAILURE)))),
        ("modes", d(0o1777, ("suid", f(0o4755, b"#!/bin/sh\n")), ("sgid", f(0o2755, b"#!/bin/sh\n")),
                    ("world", f(0o666, b"w\n")), ("sticky", d(0o1777, ("inner", f(0o644, b"i\n")))))),
        ("link", d(0o755, ("etc", ("l", ETC)))),
        ("plain", d(0o755, ("f.txt", f(0o644, b"from box\n")),
                    ("sub", d(0o755, ("x.txt", f(0o644, b"from box\n")))))),
        ("flip", d(0o755, ("ok.txt", f(0o644, b"ok\n")),
                   ("flip", lie(f(0o644), d(0o755, ("in", f(0o644))))),
                   ("flop", lie(d(0o755), f(0o644))))),
    )),
)


def key(path):
    return "/" + "/".join(c for c in path.split("/") if c not in ("", "."))


def follow(node):
    return node[1] if node[0] == "l" else node[2] if node[0] == "lie" else node


def index(node, path, out):
    out.setdefault(key(path), node)
    if follow(node)[0] == "d":
        for name, child in follow(node)[2]:
            index(child, path + "/" + name, out)
    return out


NODES = index(TREE, "/", {})


def attrs(node):
    kind = node[0]
    if kind == "lie":
        return attrs(node[1])
    if kind == "l":
        return struct.pack(">IQI", 0x5, 0, 0o120777)
    size = len(node[2]) if kind == "f" else 4096 if kind == "d" else 5
    bits = (0o040000 if kind == "d" else 0o100000) | node[1]
    return struct.pack(">IQI", 0x5, size, bits)


def string(data):
    data = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    return struct.pack(">I", len(data)) + data


class Server:
    def __init__(self):
        self.handles = {}
        self.next_handle = 0
        self.out = sys.stdout.buffer

    def send(self, kind, body):
        self.out.write(struct.pack(">IB", len(body) + 1, kind) + body)
        self.out.flush()

    def status(self, rid, code, message=""):
        self.send(STATUS, struct.pack(">II", rid, code) + string(message) + string(""))

    def handle(self, node):
        self.next_handle += 1
        name = str(self.next_handle)
        self.handles[name] = [node, False]
        return string(name)

    def lookup(self, rid, path, follow_link=True):
        node = NODES.get(key(path))
        if node is None:
            self.status(rid, NO_SUCH_FILE, "No such file")
            return None
        return follow(node) if follow_link else node

    def serve(self, kind, rid, body):
        def take_string(at):
            (n,) = struct.unpack_from(">I", body, at)
            return body[at + 4:at + 4 + n], at + 4 + n

        if kind in (STAT, LSTAT, OPEN, OPENDIR, REALPATH):
            raw, _ = take_string(0)
            path = raw.decode("utf-8", "surrogateescape")
            if kind == REALPATH:
                self.send(NAME, struct.pack(">II", rid, 1) + string(key(path)) + string("")
                          + struct.pack(">I", 0))
                return
            node = self.lookup(rid, path, follow_link=kind != LSTAT)
            if node is None:
                return
            if kind in (STAT, LSTAT):
                self.send(ATTRS, struct.pack(">I", rid) + attrs(node))
            elif kind == OPEN and node[0] == "x":
                self.status(rid, FAILURE, node[2])
            elif (kind == OPEN) != (node[0] == "f"):
                self.status(rid, FAILURE, "wrong kind of file")
            else:
                self.send(HANDLE, struct.pack(">I", rid) + self.handle(node))
            return
        if kind not in (CLOSE, FSTAT, READ, READDIR):
            self.status(rid, OP_UNSUPPORTED, "not here")
            return
        handle, at = take_string(0)
        entry = self.handles.get(handle.decode())
        if entry is None:
            self.status(rid, FAILURE, "bad handle")
        elif kind == CLOSE:
            del self.handles[handle.decode()]
            self.status(rid, OK)
        elif kind == FSTAT:
            self.send(ATTRS, struct.pack(">I", rid) + attrs(entry[0]))
        elif kind == READ:
            offset, length = struct.unpack_from(">QI", body, at)
            data = entry[0][2][offset:offset + length]
            if data:
                self.send(DATA, struct.pack(">I", rid) + string(data))
            else:
                self.status(rid, EOF, "EOF")
        elif kind == READDIR and not entry[1]:
            entry[1] = True
            listed = entry[0][2]
            names = b"".join(string(n) + string(n) + attrs(c) for n, c in listed)
            self.send(NAME, struct.pack(">II", rid, len(listed)) + names)
        else:
            self.status(rid, EOF, "EOF")

    def run(self):
        read = sys.stdin.buffer.read
        while True:
            head = read(4)
            if len(head) < 4:
                return
            (length,) = struct.unpack(">I", head)
            packet = read(length)
            if len(packet) < length:
                return
            kind = packet[0]
            if kind == INIT:
                self.send(VERSION, struct.pack(">I", 3))
                continue
            (rid,) = struct.unpack_from(">I", packet, 1)
            self.serve(kind, rid, packet[5:])


if __name__ == "__main__":
    Server().run()
