"""Celery tasks drained by taskmill beside the same tasks drained by a real
Celery worker, on the same broker, in the same run.

Subcommands:

    python bench/celery_vs_taskmill.py publish --queue Q --n N
    python bench/celery_vs_taskmill.py worker --queue Q [--results]
    python bench/celery_vs_taskmill.py version
    python bench/celery_vs_taskmill.py [compare] --taskmill target/release/taskmill

`publish` and `worker` are the entry points `taskmill bench celery` drives
(the drain comparison, timed from Rust): `publish` sends N no-op tasks and
prints one JSON line; `worker` replaces itself with the Celery worker below;
`version` prints celery's version (and fails if celery cannot be imported).
`compare` (the default) is the standalone comparison, which also has the
results scenario:

- drain: N no-op tasks (`noop`, args=[i]) are sent with app.send_task (no
  result backend, `ignore_result` set in each message) into a fresh queue;
  then the worker starts. Timed from the
  moment its consumer is attached to the moment the queue has no ready
  message left (polled every 5 ms), then checked: nothing unacknowledged and
  (taskmill) N jobs counted ok in /metrics. The tail after "no ready
  message" is at most one prefetch window of no-ops.
- results: the worker runs first; the client sends N tasks with the rpc://
  backend and waits for every AsyncResult; timed from the first send to the
  last result.

Workers:
- taskmill: `taskmill worker --celery-queue Q` (TASKMILL_QUEUES empty),
  default settings: concurrency 100, prefetch 100, idempotency claim per
  task in the default SQLite store, log level warn.
- celery: `celery -A celery_bench_app worker -P prefork -c 2 -Q Q
  --without-gossip --without-mingle --without-heartbeat -l WARNING`,
  task_acks_late, default prefetch multiplier (4).

The broker URL: --amqp-url, else BENCH_AMQP_URL, else TASKMILL_AMQP_URL,
else the local default.
Prints one line per measurement and a summary; --json FILE writes the figures.
Needs RabbitMQ (and rabbitmqctl on PATH for the unacked check, optional).
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def amqp_to_kombu(url):
    # Celery spells the default vhost "//"; taskmill's URL uses "%2f".
    return url.replace("/%2f", "//").replace("/%2F", "//")


def default_amqp_url():
    return os.environ.get("BENCH_AMQP_URL") or os.environ.get(
        "TASKMILL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"
    )


def celery_worker_argv(queue):
    """The Celery worker of the comparison, for `python -m celery` run in HERE."""
    return [
        sys.executable, "-m", "celery", "-A", "celery_bench_app", "worker",
        "-P", "prefork", "-c", "2", "-Q", queue, "-n", f"bench-{uuid.uuid4().hex[:6]}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING",
    ]


class Broker:
    """Queue depth and consumer count through passive declares (kombu)."""

    def __init__(self, url):
        from kombu import Connection

        self.conn = Connection(amqp_to_kombu(url))
        self.conn.connect()
        self.ch = self.conn.channel()

    def depth(self, queue):
        try:
            _, ready, consumers = self.ch.queue_declare(queue=queue, passive=True)
        except Exception:  # noqa: BLE001 - not declared yet
            self.ch = self.conn.channel()
            return None, 0
        return ready, consumers

    def delete(self, queue):
        for q in (queue, queue + ".dead", queue + "-cpu", queue + "-cpu.dead"):
            try:
                self.ch.queue_delete(q)
            except Exception:  # noqa: BLE001
                self.ch = self.conn.channel()
        try:
            self.ch.exchange_delete(queue)
        except Exception:  # noqa: BLE001
            self.ch = self.conn.channel()


def unacked(queue):
    """Unacknowledged messages of `queue` per rabbitmqctl, or None without it."""
    if not shutil.which("rabbitmqctl"):
        return None
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "messages_unacknowledged"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == queue:
            return int(parts[1])
    return None


def make_app(url, results):
    os.environ["BENCH_AMQP_URL"] = amqp_to_kombu(url)
    os.environ["BENCH_RESULTS"] = "1" if results else "0"
    import importlib

    import celery_bench_app

    return importlib.reload(celery_bench_app).app


def send(app, queue, n, connection=None):
    """Sends n no-op tasks with one producer; returns the AsyncResults and the time.

    Each message carries the app's `task_ignore_result` in its
    `ignore_result` header, as `noop.apply_async()` would (send_task alone
    leaves it unset): without a result backend neither worker then sends a
    result, while a bare send_task would make taskmill answer every task on
    the client's reply_to queue."""
    ignore = bool(app.conf.task_ignore_result)
    t0 = time.perf_counter()
    out = []
    producer_cm = (
        app.amqp.Producer(connection, auto_declare=False)
        if connection is not None
        else app.producer_or_acquire()
    )
    with producer_cm as producer:
        for i in range(n):
            out.append(
                app.send_task("noop", args=[i], queue=queue, producer=producer, ignore_result=ignore)
            )
    return out, time.perf_counter() - t0


class Worker:
    def __init__(self, system, queue, args, results):
        self.system = system
        self.queue = queue
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{system}-", suffix=".log", delete=False)
        env = dict(os.environ)
        if system == "taskmill":
            for k in list(env):
                if k.startswith("TASKMILL_"):
                    del env[k]
            self.data = tempfile.mkdtemp(prefix="bench-taskmill-")
            self.http = f"127.0.0.1:{free_port()}"
            env.update(
                TASKMILL_AMQP_URL=args.amqp_url,
                TASKMILL_QUEUES="",
                # Its own CPU queue (deleted with the queue), not a shared `cpu`.
                TASKMILL_CPU_QUEUE=queue + "-cpu",
                TASKMILL_HTTP_ADDR=self.http,
                TASKMILL_DATA_DIR=self.data,
                TASKMILL_LOG_LEVEL="warn",
            )
            env.update(kv.split("=", 1) for kv in args.taskmill_env)
            cmd = [args.taskmill, "worker", "--celery-queue", queue]
            cwd = None
        else:
            self.data = None
            env.update(BENCH_AMQP_URL=amqp_to_kombu(args.amqp_url))
            cmd = [sys.executable, os.path.abspath(__file__), "worker", "--queue", queue]
            if results:
                cmd.append("--results")
            cwd = HERE
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT)

    def metrics_ok(self):
        if self.system != "taskmill":
            return None
        try:
            text = urllib.request.urlopen(f"http://{self.http}/metrics", timeout=2).read().decode()
        except OSError:
            return None
        total = 0.0
        for line in text.splitlines():
            if line.startswith("taskmill_jobs_total{") and 'outcome="ok"' in line and f'queue="{self.queue}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.data:
            shutil.rmtree(self.data, ignore_errors=True)

    def tail(self):
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return "".join(f.readlines()[-20:])


def wait_for(cond, timeout, step=0.005):
    until = time.perf_counter() + timeout
    while time.perf_counter() < until:
        v = cond()
        if v:
            return v
        time.sleep(step)
    return None


def drain(system, args, broker):
    queue = f"bench-celery-{system}-{uuid.uuid4().hex[:8]}"
    app = make_app(args.amqp_url, results=False)
    _, sent_s = send(app, queue, args.tasks)
    if not wait_for(lambda: broker.depth(queue)[0] == args.tasks, 60, 0.05):
        raise SystemExit(f"{queue}: the broker does not hold {args.tasks} messages")
    worker = Worker(system, queue, args, results=False)
    try:
        started = wait_for(lambda: broker.depth(queue)[1] >= 1 and time.perf_counter(), 60)
        if not started:
            raise SystemExit(f"{system} worker did not attach a consumer:\n{worker.tail()}")
        done = wait_for(lambda: broker.depth(queue)[0] == 0 and time.perf_counter(), args.timeout)
        if not done:
            raise SystemExit(f"{system} worker did not drain {queue}:\n{worker.tail()}")
        seconds = done - started
        # Checks after the clock stopped.
        counted = None
        if system == "taskmill":
            counted = wait_for(lambda: (worker.metrics_ok() or 0) >= args.tasks and worker.metrics_ok(), 30, 0.05)
        left = wait_for(lambda: unacked(queue) == 0 and "0", 30, 0.5) if shutil.which("rabbitmqctl") else "n/a"
    finally:
        worker.stop()
        broker.delete(queue)
    return {
        "scenario": "drain",
        "system": system,
        "tasks": args.tasks,
        "send_seconds": round(sent_s, 3),
        "send_per_s": round(args.tasks / sent_s),
        "drain_seconds": round(seconds, 3),
        "jobs_per_s": round(args.tasks / seconds),
        "taskmill_ok_counted": counted,
        "unacked_after": left,
    }


def results(system, args, broker):
    queue = f"bench-celery-rpc-{system}-{uuid.uuid4().hex[:8]}"
    app = make_app(args.amqp_url, results=True)
    worker = Worker(system, queue, args, results=True)
    try:
        if not wait_for(lambda: broker.depth(queue)[1] >= 1, 60):
            raise SystemExit(f"{system} worker did not attach a consumer:\n{worker.tail()}")
        t0 = time.perf_counter()
        rs, sent_s = send(app, queue, args.result_tasks)
        values = [r.get(timeout=args.timeout) for r in rs]
        seconds = time.perf_counter() - t0
        assert values == [None] * args.result_tasks, "every no-op returns None"
    finally:
        worker.stop()
        broker.delete(queue)
    return {
        "scenario": "results",
        "system": system,
        "tasks": args.result_tasks,
        "send_seconds": round(sent_s, 3),
        "seconds": round(seconds, 3),
        "jobs_per_s": round(args.result_tasks / seconds),
    }


def compare(argv):
    p = argparse.ArgumentParser(prog="celery_vs_taskmill.py compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--taskmill", required=True, help="the taskmill binary (a release build)")
    p.add_argument("--amqp-url", default=default_amqp_url())
    p.add_argument("--tasks", type=int, default=20_000, help="tasks of the drain scenario")
    p.add_argument("--result-tasks", type=int, default=5_000, help="tasks of the results scenario (0: skip)")
    p.add_argument("--rounds", type=int, default=1, help="repeat each scenario, alternating which worker goes first")
    p.add_argument("--taskmill-env", action="append", default=[], metavar="TASKMILL_X=V", help="extra environment of the taskmill worker (repeatable)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)

    broker = Broker(args.amqp_url)
    rows = []
    for rnd in range(args.rounds):
        order = ["taskmill", "celery"] if rnd % 2 == 0 else ["celery", "taskmill"]
        for system in order:
            row = drain(system, args, broker)
            print(json.dumps(row), flush=True)
            rows.append(row)
        if args.result_tasks:
            for system in order:
                row = results(system, args, broker)
                print(json.dumps(row), flush=True)
                rows.append(row)

    def best(scenario, system):
        return max(r["jobs_per_s"] for r in rows if r["scenario"] == scenario and r["system"] == system)

    print()
    for scenario, what in (("drain", f"{args.tasks} queued no-op tasks drained"), ("results", f"{args.result_tasks} tasks, every AsyncResult.get()")):
        if not any(r["scenario"] == scenario for r in rows):
            continue
        t, c = best(scenario, "taskmill"), best(scenario, "celery")
        print(f"{scenario:8} {what}: taskmill {t} jobs/s, celery prefork(2) {c} jobs/s, ratio {t / c:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def publish(argv):
    """Sends --n no-op tasks to --queue; prints {"tasks", "send_seconds"} as JSON."""
    p = argparse.ArgumentParser(prog="celery_vs_taskmill.py publish")
    p.add_argument("--queue", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--amqp-url", default=default_amqp_url())
    args = p.parse_args(argv)
    app = make_app(args.amqp_url, results=False)
    # The sends have no publisher confirms: they go over a connection of our
    # own, closed with the AMQP close handshake, which the broker answers
    # only after every publish before it. Exiting with the app's pooled
    # connection still open could reset the socket and lose the last
    # messages in flight.
    conn = app.connection_for_write()
    try:
        _, seconds = send(app, args.queue, args.n, connection=conn)
    finally:
        conn.close()
    print(json.dumps({"tasks": args.n, "send_seconds": seconds}), flush=True)


def worker(argv):
    """Replaces this process with the comparison's Celery worker on --queue."""
    p = argparse.ArgumentParser(prog="celery_vs_taskmill.py worker")
    p.add_argument("--queue", required=True)
    p.add_argument("--results", action="store_true", help="send results to rpc://")
    p.add_argument("--amqp-url", default=default_amqp_url())
    args = p.parse_args(argv)
    os.environ["BENCH_AMQP_URL"] = amqp_to_kombu(args.amqp_url)
    os.environ["BENCH_RESULTS"] = "1" if args.results else "0"
    os.chdir(HERE)
    sys.stdout.flush()
    os.execv(sys.executable, celery_worker_argv(args.queue))


def version(_argv):
    """Prints celery's version; fails when celery cannot be imported."""
    import celery

    print(celery.__version__)


COMMANDS = {"compare": compare, "publish": publish, "worker": worker, "version": version}


def main():
    argv = sys.argv[1:]
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
    else:
        compare(argv)


if __name__ == "__main__":
    main()
