#!/usr/bin/env node
'use strict';
// Enqueue taskmill jobs from the command line with the Node producer
// (taskmill.js). Prints one JSON line per confirmed job:
// {"id", "kind", "queue", "exchange", "routing_key"}.
//
//   node enqueue.js --url amqp://guest:guest@127.0.0.1:5672/%2f --queue default \
//     --kind io.sleep --payload '{"ms": 250}' [--idempotency-key order-42] \
//     [--delay-ms 30000] [--timeout-ms 5000] [--traceparent 00-...-01] [--count N]
//
// Exit status: 0 when every job was confirmed by the broker, 1 otherwise, 2 on
// a usage error.
const { parseArgs } = require('node:util');
const taskmill = require('./taskmill');

function usage(msg) {
  process.stderr.write(`enqueue.js: ${msg}\n`);
  process.exit(2);
}

async function main() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        url: { type: 'string', default: process.env.TASKMILL_AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f' },
        queue: { type: 'string', default: 'default' },
        kind: { type: 'string' },
        payload: { type: 'string', default: 'null' },
        'idempotency-key': { type: 'string' },
        'delay-ms': { type: 'string' },
        'timeout-ms': { type: 'string' },
        traceparent: { type: 'string' },
        count: { type: 'string', default: '1' },
      },
      strict: true,
    }));
  } catch (e) {
    usage(e.message);
  }
  if (!values.kind) usage('--kind is required');
  let payload;
  try {
    payload = JSON.parse(values.payload);
  } catch (e) {
    usage(`--payload is not JSON: ${e.message}`);
  }
  const int = (name) => {
    if (values[name] === undefined) return undefined;
    const n = Number(values[name]);
    if (!Number.isInteger(n) || n < 0) usage(`--${name} must be an integer >= 0`);
    return n;
  };
  const count = int('count');
  const producer = await taskmill.connect(values.url);
  try {
    for (let i = 0; i < count; i++) {
      const { id, exchange, routingKey } = await producer.enqueueRouted({
        kind: values.kind,
        payload,
        queue: values.queue,
        idempotencyKey: values['idempotency-key'],
        delayMs: int('delay-ms'),
        timeoutMs: int('timeout-ms'),
        traceparent: values.traceparent,
      });
      const line = { id, kind: values.kind, queue: values.queue, exchange, routing_key: routingKey };
      process.stdout.write(`${JSON.stringify(line)}\n`);
    }
  } finally {
    await producer.close();
  }
}

main().catch((e) => {
  process.stderr.write(`enqueue.js: ${e.message}\n`);
  process.exit(1);
});
