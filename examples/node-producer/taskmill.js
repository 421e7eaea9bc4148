'use strict';
// A taskmill producer for Node.js, written from docs/protocol.md only
// (wire protocol v1). It publishes jobs to RabbitMQ with amqplib:
//
//   - to exchange `taskmill`, routing key = the queue name, `mandatory`, so an
//     unroutable job (no worker has declared the queue yet) is an error;
//   - on a confirm channel: a job is enqueued only once the broker acked it;
//   - persistent (delivery_mode 2), `message_id` = a UUIDv4 job id,
//     `content_type` application/json, `timestamp` in seconds;
//   - headers `taskmill-kind` (required), `taskmill-protocol` 1,
//     `taskmill-attempt` 1, `taskmill-enqueued-at-us`, and when given
//     `taskmill-idempotency-key`, `taskmill-timeout-ms`, `traceparent`;
//   - a delay through the broker's delay ladder (exchange `taskmill.delay.24`,
//     routing key = 25 binary digits + the queue), after checking that the
//     target queue exists (the ladder would drop a job for a missing queue).
//
//   const taskmill = require('./taskmill');
//   const producer = await taskmill.connect('amqp://guest:guest@127.0.0.1:5672/%2f');
//   const id = await producer.enqueue({ kind: 'io.sleep', payload: { ms: 250 },
//                                       queue: 'default', idempotencyKey: 'order-42' });
//   await producer.close();

const crypto = require('node:crypto');
const amqp = require('amqplib');

const EXCHANGE = 'taskmill';
const DELAY_EXCHANGE = 'taskmill.delay.24';
const DELAY_LEVELS = 25;
const DELAY_TICK_MS = 100;
const MAX_DELAY_TICKS = 2 ** DELAY_LEVELS - 1; // about 38.8 days
const MAX_KIND_BYTES = 255;
const MAX_KEY_BYTES = 255;
const DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024; // the worker's max_payload_bytes default

class EnqueueError extends Error {}

// The delay ladder's routing key for `delayMs` to `queue`: the delay rounded
// up to 100 ms ticks, written in binary as 25 words, level 24 first.
function delayRoutingKey(queue, delayMs) {
  const ticks = Math.ceil(delayMs / DELAY_TICK_MS);
  if (ticks > MAX_DELAY_TICKS) {
    throw new EnqueueError(`delay ${delayMs} ms is longer than the ladder's maximum (${MAX_DELAY_TICKS * DELAY_TICK_MS} ms)`);
  }
  const words = [];
  for (let level = DELAY_LEVELS - 1; level >= 0; level--) {
    words.push(Math.floor(ticks / 2 ** level) % 2 === 1 ? '1' : '0');
  }
  return `${words.join('.')}.${queue}`;
}

// Checks a job against the limits of docs/protocol.md before it is sent, so
// a mistake is an error here rather than a dead letter later.
function validate(job, maxPayloadBytes) {
  if (typeof job.kind !== 'string' || job.kind.length === 0 || Buffer.byteLength(job.kind) > MAX_KIND_BYTES) {
    throw new EnqueueError('kind must be a string of 1 to 255 bytes');
  }
  const key = job.idempotencyKey;
  if (key !== undefined && (typeof key !== 'string' || key.length === 0 || Buffer.byteLength(key) > MAX_KEY_BYTES
      || /[\u0000-\u001f\u007f-\u009f]/.test(key))) {
    throw new EnqueueError('idempotencyKey must be 1 to 255 bytes without control characters');
  }
  if (job.timeoutMs !== undefined && !(Number.isInteger(job.timeoutMs) && job.timeoutMs > 0)) {
    throw new EnqueueError('timeoutMs must be an integer > 0');
  }
  if (job.delayMs !== undefined && !(Number.isFinite(job.delayMs) && job.delayMs >= 0)) {
    throw new EnqueueError('delayMs must be a number >= 0');
  }
  const body = Buffer.from(JSON.stringify(job.payload === undefined ? null : job.payload), 'utf8');
  if (body.length > maxPayloadBytes) {
    throw new EnqueueError(`payload is ${body.length} bytes, over the limit of ${maxPayloadBytes}`);
  }
  return body;
}

class Producer {
  constructor(connection, channel, maxPayloadBytes) {
    this.connection = connection;
    this.channel = channel;
    this.maxPayloadBytes = maxPayloadBytes;
    // Jobs the broker returned as unroutable (basic.return arrives before the ack).
    this.returned = new Set();
    channel.on('return', (msg) => this.returned.add(msg.properties.messageId));
    // A channel error (e.g. exchange `taskmill` missing: 404) fails the
    // pending publishes; keep the broker's reason for their error message.
    this.channelError = null;
    channel.on('error', (e) => { this.channelError = e; });
  }

  // Publishes one job and resolves to its id once the broker confirmed it.
  // (enqueueRouted also gives the exchange and routing key it used.)
  // job: { kind, payload, queue = 'default', idempotencyKey, timeoutMs,
  //        delayMs, traceparent, tracestate, jobId }
  async enqueue(job) {
    return (await this.enqueueRouted(job)).id;
  }

  async enqueueRouted(job) {
    const body = validate(job, this.maxPayloadBytes);
    const queue = job.queue || 'default';
    const id = job.jobId || crypto.randomUUID();
    const delayMs = job.delayMs || 0;
    const dueMs = Date.now() + delayMs;
    const headers = {
      'taskmill-kind': job.kind,
      'taskmill-protocol': 1,
      'taskmill-attempt': 1,
      // Microseconds since the epoch, a 64-bit integer on the wire. For a
      // delayed job, the time it becomes due (queue wait excludes the delay).
      'taskmill-enqueued-at-us': { '!': 'long', value: dueMs * 1000 },
    };
    if (job.idempotencyKey !== undefined) headers['taskmill-idempotency-key'] = job.idempotencyKey;
    if (job.timeoutMs !== undefined) headers['taskmill-timeout-ms'] = { '!': 'long', value: job.timeoutMs };
    if (job.traceparent !== undefined) headers.traceparent = job.traceparent;
    if (job.tracestate !== undefined) headers.tracestate = job.tracestate;

    let exchange = EXCHANGE;
    let routingKey = queue;
    if (delayMs > 0) {
      // The ladder accepts the job whatever the queue, and drops it when due
      // if the queue does not exist: check first (on a throwaway channel,
      // since a failed passive declare closes its channel).
      await this.checkQueue(queue);
      exchange = DELAY_EXCHANGE;
      routingKey = delayRoutingKey(queue, delayMs);
    }
    const options = {
      mandatory: true,
      persistent: true,
      messageId: id,
      contentType: 'application/json',
      timestamp: Math.floor(Date.now() / 1000),
      headers,
    };
    await new Promise((resolve, reject) => {
      this.channel.publish(exchange, routingKey, body, options, (err) => {
        if (err && this.channelError) {
          reject(new EnqueueError(`job ${id} not enqueued: ${this.channelError.message}`));
        } else if (err) {
          reject(new EnqueueError(`broker refused job ${id} (nack): publish it again with the same id`));
        } else {
          resolve();
        }
      });
    });
    if (this.returned.delete(id)) {
      throw new EnqueueError(`job ${id} is unroutable: no queue ${JSON.stringify(queue)} is bound to exchange `
        + `${JSON.stringify(exchange)} (start a worker for the queue first, it declares the topology)`);
    }
    return { id, exchange, routingKey };
  }

  async checkQueue(queue) {
    const ch = await this.connection.createChannel();
    ch.on('error', () => {}); // a 404 closes this channel only; reported below
    try {
      await ch.checkQueue(queue);
    } catch (e) {
      throw new EnqueueError(`queue ${JSON.stringify(queue)} does not exist: a delayed job for it would be dropped `
        + 'when due (start a worker for the queue first)');
    }
    await ch.close();
  }

  async close() {
    await this.channel.close();
    await this.connection.close();
  }
}

async function connect(url, { maxPayloadBytes = DEFAULT_MAX_PAYLOAD_BYTES } = {}) {
  const connection = await amqp.connect(url, { clientProperties: { connection_name: 'taskmill node producer' } });
  const channel = await connection.createConfirmChannel();
  return new Producer(connection, channel, maxPayloadBytes);
}

module.exports = { connect, delayRoutingKey, EnqueueError, Producer };
