"""Takes every message from a queue (basic_get) and validates each against
docs/schema/job-message.json, the JSON Schema of a taskmill job message.

    check_job_messages.py SCHEMA AMQP_URL QUEUE EXCHANGE_OF_EACH.json

Run by crates/taskmill/tests/messages_match_the_schema.rs with the venv's
Python (pika, jsonschema). The broker does not tell a consumer which exchange
a message was published to for a message that went through the delay ladder
(it arrives from `taskmill.delay.deliver`), so the test passes, per job id, the
exchange and routing key the producer used (a JSON object {id: [exchange,
routing_key]}); everything else is what the broker delivered.

Prints one JSON line per message: {"id", "valid", "errors", "instance"};
exits 0 when every message is valid, 1 otherwise.
"""
import json
import sys

import jsonschema
import pika


def text(v):
    return v.decode("utf-8") if isinstance(v, bytes) else v


def to_json(v):
    """An AMQP field value as pika decodes it, as JSON."""
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, dict):
        return {k: to_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [to_json(x) for x in v]
    if hasattr(v, "timestamp") and callable(v.timestamp):  # datetime (AMQP timestamp in a table)
        return int(v.timestamp())
    return v


def main() -> int:
    schema_path, url, queue, routes_path = sys.argv[1:5]
    schema = json.load(open(schema_path))
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    routes = json.load(open(routes_path))

    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    all_valid = True
    while True:
        method, props, body = ch.basic_get(queue, auto_ack=False)
        if method is None:
            break
        properties = {}
        for name in ("message_id", "content_type", "delivery_mode", "timestamp", "correlation_id",
                     "expiration", "priority", "type", "app_id", "reply_to", "content_encoding"):
            value = getattr(props, name)
            if value is not None:
                properties[name] = text(value)
        headers = to_json(dict(props.headers or {}))
        # Headers the broker adds: x-death / x-first-death-* when a message
        # leaves a delay-ladder queue by TTL, x-delivery-count on quorum
        # queues. They are the broker's, not the producer's.
        headers = {k: v for k, v in headers.items() if not k.startswith(("x-death", "x-first-death", "x-last-death", "x-delivery-count"))}
        try:
            parsed = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            parsed = {"__not_json__": str(e)}
        exchange, routing_key = routes.get(properties.get("message_id"), [method.exchange, method.routing_key])
        instance = {
            "exchange": exchange,
            "routing_key": routing_key,
            "properties": properties,
            "headers": headers,
            "body": parsed,
        }
        errors = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                  for e in validator.iter_errors(instance)]
        if "__not_json__" in (parsed if isinstance(parsed, dict) else {}):
            errors.append(f"body: not JSON: {parsed['__not_json__']}")
        all_valid = all_valid and not errors
        print(json.dumps({"id": properties.get("message_id"), "valid": not errors, "errors": errors,
                          "instance": instance}))
        ch.basic_ack(method.delivery_tag)
    conn.close()
    return 0 if all_valid else 1


if __name__ == "__main__":
    sys.exit(main())
