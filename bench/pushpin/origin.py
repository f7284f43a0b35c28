#!/usr/bin/env python3
"""The GRIP origin behind Pushpin in the benchmark: it holds no connection and no message,
it only answers each request with GRIP instructions (pushpin.org/docs, "GRIP"):

- GET /sub/<channel> (EventSource / HTTP streaming): `Grip-Hold: stream` on <channel>;
- GET /poll/<channel> (long-poll): `Grip-Hold: response` on <channel>, 30 s timeout;
- POST /sub/<channel> with `Content-Type: application/websocket-events` (WebSocket-over-HTTP,
  the route's `over_http`): accepts the WebSocket (`OPEN`) and subscribes it to <channel>
  with a `c:` control message; later events (client text, `CLOSE`) are acknowledged.

Messages are published straight to Pushpin's HTTP publish endpoint by the load generator.
Standard library only (asyncio), HTTP/1.1 keep-alive.

    python3 bench/pushpin/origin.py PORT
"""
import asyncio
import json
import sys


def reply(status, headers, body=b""):
    head = [f"HTTP/1.1 {status}"]
    head += [f"{k}: {v}" for k, v in headers]
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def ws_event(kind, content=None):
    if content is None:
        return f"{kind}\r\n".encode()
    data = content.encode()
    return f"{kind} {len(data):x}\r\n".encode() + data + b"\r\n"


def answer(method, path, headers, body):
    parts = path.split("?")[0].strip("/").split("/")
    if len(parts) != 2 or parts[0] not in ("sub", "poll"):
        return reply("404 Not Found", [("Content-Type", "text/plain")], b"not found\n")
    kind, channel = parts
    if method == "POST" and headers.get("content-type", "").startswith("application/websocket-events"):
        out = b""
        if body.startswith(b"OPEN"):
            sub = json.dumps({"type": "subscribe", "channel": channel})
            out = ws_event("OPEN") + ws_event("TEXT", "c:" + sub)
        elif b"CLOSE" in body.split(b"\r\n", 1)[0]:
            out = ws_event("CLOSE")
        return reply(
            "200 OK",
            [("Content-Type", "application/websocket-events"), ("Sec-WebSocket-Extensions", "grip")],
            out,
        )
    if kind == "poll":
        return reply(
            "200 OK",
            [("Content-Type", "text/plain"), ("Grip-Hold", "response"), ("Grip-Channel", channel),
             ("Grip-Timeout", "30")],
            b"\n",
        )
    return reply(
        "200 OK",
        [("Content-Type", "text/event-stream"), ("Grip-Hold", "stream"), ("Grip-Channel", channel),
         ("Cache-Control", "no-cache")],
        b": subscribed\n\n",
    )


async def serve(reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            method, path, _ = line.decode("latin-1").split(" ", 2)
            headers = {}
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            n = int(headers.get("content-length", "0") or 0)
            body = await reader.readexactly(n) if n else b""
            writer.write(answer(method, path, headers, body))
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()


async def main(port):
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
