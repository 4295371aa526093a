#!/usr/bin/env python3
"""A ProxyCommand into a box-sim box like tests/support/localcloud/box-connect, but with one thread
per direction, so a blocked write in one direction never stops the other (as with `ssh -W`, `nc`
or the SSM plugin). The benchmark uses it to measure the SSH pipe when box-connect's
single-threaded relay cannot be used.

usage: relay.py BASE_URL INSTANCE_ID
"""

import json
import os
import socket
import sys
import threading
import urllib.request


def main():
    base, iid = sys.argv[1].rstrip("/"), sys.argv[2]
    try:
        with urllib.request.urlopen(f"{base}/_localcloud/box/{iid}", timeout=5) as r:
            box = json.load(r)
    except Exception as e:  # noqa: BLE001
        sys.stderr.write(f"relay: {iid}: {e}\n")
        sys.exit(1)
    if box.get("state") != "up" or not box.get("ssh_port"):
        sys.stderr.write(f"relay: {iid}: not reachable (state={box.get('state')})\n")
        sys.exit(1)
    sock = socket.create_connection(("127.0.0.1", int(box["ssh_port"])), timeout=5)
    sock.settimeout(None)

    def upstream():
        try:
            while True:
                data = os.read(0, 262144)
                if not data:
                    break
                sock.sendall(data)
        except OSError:
            pass
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threading.Thread(target=upstream, daemon=True).start()
    try:
        while True:
            data = sock.recv(262144)
            if not data:
                break
            view = memoryview(data)
            while view:
                n = os.write(1, view)
                view = view[n:]
    except OSError:
        pass
    finally:
        sock.close()


if __name__ == "__main__":
    main()
