#!/usr/bin/env python3
"""Connection flood for tests/flood.rs, run as a child process so its sockets
count against its own file-descriptor limit, not the server's.

Reads "host port count" from stdin, opens `count` TCP connections that never
send a byte, prints "open N" (N = how many connected), then holds them until
stdin closes.
"""
import socket
import sys

host, port, count = sys.stdin.readline().split()
port, count = int(port), int(count)
conns = []
for _ in range(count):
    try:
        conns.append(socket.create_connection((host, port), timeout=5))
    except OSError as err:
        print(f"connect failed: {err}", file=sys.stderr, flush=True)
        break
print(f"open {len(conns)}", flush=True)
sys.stdin.read()
