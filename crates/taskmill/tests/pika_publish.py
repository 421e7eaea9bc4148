"""Publishes one taskmill job with pika, following only docs/protocol.md.

Usage: pika_publish.py AMQP_URL QUEUE PAYLOAD_JSON TRACEPARENT
Exits non-zero if the broker does not confirm the message.
"""
import json
import sys
import time
import uuid

import pika

url, queue, payload, traceparent = sys.argv[1:5]
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
ch.confirm_delivery()  # publisher confirms: basic_publish raises if not confirmed
ch.basic_publish(
    exchange="taskmill",
    routing_key=queue,
    body=json.dumps(json.loads(payload)).encode(),
    properties=pika.BasicProperties(
        message_id=str(uuid.uuid4()),
        content_type="application/json",
        delivery_mode=2,
        timestamp=int(time.time()),
        headers={"taskmill-kind": "test.record", "traceparent": traceparent},
    ),
    mandatory=True,
)
conn.close()
print("published")
