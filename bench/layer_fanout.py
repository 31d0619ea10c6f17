"""Compare channels-redis's pub/sub and core layers for one room's fan-out.

Usage: .venv/bin/python bench/layer_fanout.py [--members 1000] [--burst 2000]

Prints, for each layer: the time until every member of one group in this
process has received one group_send (median of 5), and how many of a burst
of group_sends reach one member. Talks to the Redis at REDIS_URL only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

from channels_redis.core import RedisChannelLayer
from channels_redis.pubsub import RedisPubSubChannelLayer

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
HOST = {"address": REDIS_URL, "socket_timeout": 30, "socket_connect_timeout": 5, "max_connections": 1000}


async def fanout_seconds(layer, members: int, rounds: int = 5) -> float:
    group = f"bench-{uuid.uuid4().hex}"
    channels = [await layer.new_channel() for _ in range(members)]
    for channel in channels:
        await layer.group_add(group, channel)
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        await layer.group_send(group, {"type": "bench.message", "text": "x" * 200})
        await asyncio.wait_for(asyncio.gather(*(layer.receive(channel) for channel in channels)), 30)
        timings.append(time.perf_counter() - started)
    for channel in channels:
        await layer.group_discard(group, channel)
    return statistics.median(timings)


async def burst_received(layer, burst: int) -> int:
    group = f"bench-{uuid.uuid4().hex}"
    channel = await layer.new_channel()
    await layer.group_add(group, channel)
    for n in range(burst):
        await layer.group_send(group, {"type": "bench.message", "n": n})
    received = 0
    try:
        while True:
            await asyncio.wait_for(layer.receive(channel), 1.0)
            received += 1
    except TimeoutError:
        pass
    await layer.group_discard(group, channel)
    return received


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--burst", type=int, default=2000)
    args = parser.parse_args()
    layers = {
        "pubsub (RedisPubSubChannelLayer)": RedisPubSubChannelLayer(
            hosts=[HOST], prefix=f"bench-{uuid.uuid4().hex[:6]}"
        ),
        "core (RedisChannelLayer, capacity=100)": RedisChannelLayer(
            hosts=[HOST], prefix=f"bench-{uuid.uuid4().hex[:6]}"
        ),
    }
    print(f"{'layer':42} {'fan-out to ' + str(args.members):>18} {'burst received':>16}")
    for name, layer in layers.items():
        seconds = await fanout_seconds(layer, args.members)
        received = await burst_received(layer, args.burst)
        print(f"{name:42} {seconds * 1000:15.1f} ms {received:>9}/{args.burst}")
        await layer.flush()


if __name__ == "__main__":
    asyncio.run(main())
