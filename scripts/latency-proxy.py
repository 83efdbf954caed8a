#!/usr/bin/env python3
"""A TCP proxy that adds a round trip's latency to every request.

    scripts/latency-proxy.py LISTEN_PORT UPSTREAM_HOST:PORT DELAY_MS

Each time a client sends after having received (a new request on a kept
alive connection), the bytes wait DELAY_MS before going upstream: an S3
server on loopback then behaves like one across a network.
"""
import asyncio
import sys


async def pump(reader, writer, delay, state, upstream):
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            if upstream and state["new_request"]:
                state["new_request"] = False
                await asyncio.sleep(delay)
            if not upstream:
                state["new_request"] = True
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main():
    port, upstream, delay_ms = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    host, up_port = upstream.rsplit(":", 1)
    delay = delay_ms / 1000

    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection(host, int(up_port))
        except OSError:
            client_w.close()
            return
        state = {"new_request": True}
        await asyncio.gather(
            pump(client_r, server_w, delay, state, True),
            pump(server_r, client_w, delay, state, False),
        )

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


asyncio.run(main())
