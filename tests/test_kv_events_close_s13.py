"""A KV-event publisher's ports are free the moment it has closed: zmq closes a socket in its I/O thread after
close() returns, so a server restarted at once on the same ports (its --kv-events-config unchanged) could find them
still bound; the publisher terminates its own zmq context, which waits for that."""
from __future__ import annotations

import json

import zmq

from server.kv_events import ZmqEventPublisher, parse_kv_events_config
from server.testing import free_port


def test_the_ports_can_be_bound_again_right_after_close():
    for _ in range(20):
        pub, replay = free_port(), free_port()
        config = parse_kv_events_config(json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{pub}",
                                                    "replay_endpoint": f"tcp://*:{replay}"}))
        ZmqEventPublisher(config, 0).close()
        ctx = zmq.Context()
        try:
            for port in (pub, replay):
                sock = ctx.socket(zmq.PUB)
                try:
                    sock.bind(f"tcp://*:{port}")  # (raises "Address already in use" while the old socket lingers)
                finally:
                    sock.close(linger=0)
        finally:
            ctx.term()
