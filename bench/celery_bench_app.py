"""The Celery app of bench/celery_vs_taskmill.py: one no-op task named `noop`,
the name of taskmill's built-in no-op kind, so the very same messages can be
drained by a Celery worker or by `taskmill worker --celery-queue`.

Broker from BENCH_AMQP_URL. acks_late (ack after the task ran, as taskmill
does), default prefetch multiplier (4). Results go to rpc:// only when
BENCH_RESULTS=1.
"""
import os

from celery import Celery

app = Celery(
    "taskmill-bench",
    broker=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend="rpc://" if os.environ.get("BENCH_RESULTS") == "1" else None,
)
app.conf.update(
    task_acks_late=True,
    task_ignore_result=os.environ.get("BENCH_RESULTS") != "1",
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop(*args, **kwargs):
    return None
