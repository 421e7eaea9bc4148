"""A real Celery 5 client against a taskmill worker serving QUEUE in Celery mode.

Usage: celery_client.py AMQP_URL QUEUE TRACEPARENT

Sends tasks with app.send_task, exactly as a Python service would, and checks
what AsyncResult.get() returns or raises (rpc:// result backend). The worker
(crates/taskmill/tests/celery_producers_get_results.rs) registers:
  tests.add    (a, b, scale=1) -> (a + b) * scale
  tests.echo   (x)             -> x
  tests.fail   (message)       -> permanent error with that message
  tests.flaky  ()              -> fails attempt 1 (retryable), returns the attempt
  tests.when   ()              -> the Unix time it ran at
  tests.sleep  (ms)            -> sleeps ms (kind allows 1 attempt)
Prints one line per check; exits 1 on the first failed check.
"""
import sys
import time
from datetime import datetime, timedelta, timezone

from celery import Celery
from celery.exceptions import NotRegistered, TaskRevokedError, TimeLimitExceeded
from kombu.exceptions import ContentDisallowed

url, queue, traceparent = sys.argv[1:4]


def make_app(**conf):
    app = Celery("taskmill-celery-test", broker=url, backend="rpc://")
    app.conf.update(
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        result_accept_content=["json"],
        **conf,
    )
    return app


app = make_app()
TIMEOUT = 30


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}", flush=True)


def raises(result, exc_type):
    try:
        value = result.get(timeout=TIMEOUT)
    except exc_type as e:
        return e
    except Exception as e:  # noqa: BLE001 - report what came instead
        check(f"raises {exc_type.__name__}", False, f"got {type(e).__module__}.{type(e).__name__}: {e!r}")
    check(f"raises {exc_type.__name__}", False, f"returned {value!r}")


# Success, with args and kwargs.
r = app.send_task("tests.add", args=[2, 3], kwargs={"scale": 10})
check("add returns its result", r.get(timeout=TIMEOUT) == 50)
check("state is SUCCESS", r.state == "SUCCESS", r.state)

# A handler error is raised as the Python exception, with its message.
e = raises(app.send_task("tests.fail", args=["the report is on fire"]), RuntimeError)
check("handler error message", str(e) == "the report is on fire", repr(e))
r = app.send_task("tests.fail", args=["again"])
r.get(timeout=TIMEOUT, propagate=False)
check("failed state is FAILURE", r.state == "FAILURE", r.state)

# A retryable error: retried through taskmill's policy, still a Celery
# message (same id, retries + 1), then the success reaches the client.
check("retried task succeeds on attempt 2", app.send_task("tests.flaky").get(timeout=TIMEOUT) == 2)

# countdown: not run before 2 s.
t0 = time.time()
ran_at = app.send_task("tests.when", countdown=2).get(timeout=TIMEOUT)
check("countdown=2 is honoured", ran_at - t0 >= 2.0, f"ran {ran_at - t0:.3f} s after sending")

# time_limit is the hard timeout.
e = raises(app.send_task("tests.sleep", args=[5000], time_limit=1), TimeLimitExceeded)
check("time_limit=1 stops a 5 s task", True)

# An expired task does not run: REVOKED, like Celery.
past = datetime.now(timezone.utc) - timedelta(seconds=5)
r = app.send_task("tests.echo", args=["late"], expires=past)
raises(r, TaskRevokedError)
check("expired task is REVOKED", r.state == "REVOKED", r.state)

# An unknown task name: NotRegistered, like a Celery worker reports it.
e = raises(app.send_task("tests.nope"), NotRegistered)
check("unknown task names itself", "tests.nope" in str(e), repr(e))

# Trace context from a traceparent header (as OpenTelemetry's Celery
# instrumentation sets it).
check(
    "traceparent header is accepted",
    app.send_task("tests.echo", args=["traced"], headers={"traceparent": traceparent}).get(timeout=TIMEOUT) == "traced",
)

# 1 000 tasks in flight at once: every result arrives.
t0 = time.time()
results = [app.send_task("tests.echo", args=[i]) for i in range(1000)]
values = [r.get(timeout=60) for r in results]
check("1000 results in flight", values == list(range(1000)), f"{sum(a == b for a, b in zip(values, range(1000)))} of 1000 match")
print(f"     1000 tasks sent and answered in {time.time() - t0:.2f} s", flush=True)

# Pickle is never decoded: dead-lettered, and the client is told.
e = raises(app.send_task("tests.echo", args=["pickled"], serializer="pickle"), ContentDisallowed)
check("pickle is refused", "pickle" in str(e), repr(e))

# Protocol v1 is refused (the worker reports it as ValueError).
v1 = make_app(task_protocol=1)
e = raises(v1.send_task("tests.echo", args=["v1"]), ValueError)
check("protocol v1 is refused", "v1" in str(e), repr(e))

# Celery's producer declared the exchange named like the queue; leave nothing
# behind (the test deletes the queues).
with app.connection_for_write() as conn:
    conn.default_channel.exchange_delete(queue)

print("all checks passed", flush=True)
