#!/usr/bin/env python3
"""Read the ledger's event topic from a shell with an ordinary Kafka client (confluent-kafka).

    pip install confluent-kafka
    python3 scripts/read-events.py --brokers 127.0.0.1:9092 [--topic ledger.events] [--limit 10] [--idle 5]

Prints one JSON object per message: key, partition, offset, headers and the event envelope (docs/events.md).
Reads from the beginning under a throw-away consumer group; stops after --limit messages or --idle seconds
without a message.
"""
import argparse
import json
import sys
import time
import uuid

from confluent_kafka import Consumer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topic", default="ledger.events")
    parser.add_argument("--limit", type=int, default=0, help="stop after this many messages (0: no limit)")
    parser.add_argument("--idle", type=float, default=5.0, help="stop after this many seconds without a message")
    args = parser.parse_args()

    consumer = Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": f"read-events-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    consumer.subscribe([args.topic])
    count, last_message = 0, time.monotonic()
    try:
        while args.limit == 0 or count < args.limit:
            message = consumer.poll(0.5)
            if message is None:
                if time.monotonic() - last_message > args.idle:
                    break
                continue
            if message.error():
                print(f"read-events: {message.error()}", file=sys.stderr)
                continue
            last_message = time.monotonic()
            headers = {key: value.decode() for key, value in (message.headers() or [])}
            print(json.dumps({
                "key": message.key().decode() if message.key() else None,
                "partition": message.partition(),
                "offset": message.offset(),
                "headers": headers,
                "event": json.loads(message.value()),
            }))
            count += 1
    finally:
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
