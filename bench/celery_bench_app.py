"""The Celery app of the Celery comparison (`taskmill bench celery` and
bench/celery_vs_taskmill.py): one no-op task named `noop`, the name of
taskmill's built-in no-op kind, so the very same messages can be drained by a
Celery worker or by `taskmill worker --celery-queue`.

Broker from BENCH_AMQP_URL (taskmill's `/%2f` spelling of the default vhost is
accepted). acks_late (ack after the task ran, as taskmill does), default
prefetch multiplier (4). Results go to rpc:// only when BENCH_RESULTS=1.
"""
import os

from celery import Celery


def amqp_to_kombu(url):
    """Celery spells the default vhost "//"; taskmill's URL uses "%2f"."""
    return url.replace("/%2f", "//").replace("/%2F", "//")


app = Celery(
    "taskmill-bench",
    broker=amqp_to_kombu(os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")),
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
