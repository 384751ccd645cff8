"""Drive `cfq-relay emulate` with Cloudflare's official Python SDK (PyPI `cloudflare`, 5.x).

Every call must parse into the SDK's types (re-validated strictly with pydantic), and every
error must raise the SDK's typed exception carrying the documented Queues error code.
Run by .ci/run in a venv: `python .ci/sdk_conformance.py target/debug/cfq-relay`.
Not needed by `cargo test`.
"""

import base64
import os
import socket
import subprocess
import sys

import cloudflare
from cloudflare import Cloudflare
from cloudflare.types.queues import (
    Consumer,
    MessageAckResponse,
    MessageBulkPushResponse,
    MessagePeekResponse,
    MessagePullResponse,
    MessagePurgeResponse,
    MessagePushResponse,
    PurgeStatusResponse,
    Queue,
    QueueGetMetricsResponse,
)
from pydantic import TypeAdapter

ACCOUNT = "0123456789abcdef0123456789abcdef"
TOKEN = "sdk-token"
checks = 0


def strict(model, value):
    """Re-validate what the SDK built (it constructs models leniently) against its own type."""
    global checks
    assert value is not None, f"{model}: no result"
    TypeAdapter(model).validate_python(value.model_dump(), strict=False)
    checks += 1
    return value


def raises(exc_type, code, fn, *args, **kwargs):
    """`fn` must raise `exc_type` whose body carries Cloudflare error `code`."""
    global checks
    try:
        fn(*args, **kwargs)
    except exc_type as e:
        got = e.body["errors"][0]["code"] if isinstance(e.body, dict) else None
        assert got == code, f"{fn.__qualname__}: expected code {code}, got {got}: {e.body}"
        checks += 1
        return
    raise AssertionError(f"{fn.__qualname__}: expected {exc_type.__name__} {code}, no error")


def main(binary):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    emu = subprocess.Popen(
        [binary, "emulate", "--listen", f"127.0.0.1:{port}", "--token", TOKEN,
         "--queue", "sdk-queue", "--max-retries", "5"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "warn"},
    )
    try:
        line = emu.stdout.readline()
        assert "api_base_url" in line, line
        run(f"http://127.0.0.1:{port}/client/v4")
    finally:
        emu.terminate()
        emu.wait(timeout=10)
    print(f"sdk conformance: {checks} checks passed (cloudflare {cloudflare.__version__})")


def run(base):
    cf = Cloudflare(api_token=TOKEN, base_url=base, max_retries=0)
    q = cf.queues
    m = q.messages

    # Queues and consumers.
    names = [x.queue_name for x in q.list(account_id=ACCOUNT)]
    assert names == ["sdk-queue"], names
    sdk = strict(Queue, q.get("sdk-queue", account_id=ACCOUNT))
    assert len(sdk.queue_id) == 32 and sdk.consumers[0].type == "http_pull", sdk
    qid = sdk.queue_id
    assert strict(Queue, q.get(qid, account_id=ACCOUNT)).queue_name == "sdk-queue"
    created = strict(Queue, q.create(account_id=ACCOUNT, queue_name="sdk-other"))
    assert created.consumers == [], created
    raises(cloudflare.ConflictError, 11009, q.create, account_id=ACCOUNT, queue_name="sdk-other")
    consumer = strict(Consumer, q.consumers.create(
        created.queue_id, account_id=ACCOUNT, type="http_pull",
        settings={"batch_size": 10.0, "visibility_timeout_ms": 60000.0}))
    assert consumer.type == "http_pull" and consumer.settings.batch_size == 10, consumer
    listed = list(q.consumers.list(created.queue_id, account_id=ACCOUNT))
    assert [c.consumer_id for c in listed] == [consumer.consumer_id], listed
    strict(Consumer, q.consumers.get(consumer.consumer_id, account_id=ACCOUNT, queue_id=created.queue_id))
    changed = strict(Consumer, q.consumers.update(consumer.consumer_id, account_id=ACCOUNT,
                                                  queue_id=created.queue_id, type="http_pull",
                                                  settings={"max_retries": 7.0}))
    assert changed.settings.max_retries == 7, changed
    assert q.consumers.delete(consumer.consumer_id, account_id=ACCOUNT, queue_id=created.queue_id).success
    edited = strict(Queue, q.edit(created.queue_id, account_id=ACCOUNT, queue_name="sdk-renamed",
                                  settings={"delivery_delay": 0.0, "delivery_paused": False}))
    assert edited.queue_name == "sdk-renamed" and edited.queue_id == created.queue_id, edited
    updated = strict(Queue, q.update(created.queue_id, account_id=ACCOUNT, queue_name="sdk-renamed",
                                     settings={"message_retention_period": 86400}))
    assert updated.settings.message_retention_period == 86400, updated
    assert q.delete(created.queue_id, account_id=ACCOUNT).success
    raises(cloudflare.NotFoundError, 10104, q.get, created.queue_id, account_id=ACCOUNT)

    # Producers: the SDK's push answers carry the backlog metrics.
    r = strict(MessagePushResponse, m.push(qid, account_id=ACCOUNT, body="hello", content_type="text"))
    assert r.metadata.metrics.backlog_count == 1, r
    r = strict(MessagePushResponse, m.push(qid, account_id=ACCOUNT, body={"k": [1, 2]}, content_type="json",
                                           delay_seconds=0.0))
    r = strict(MessageBulkPushResponse, m.bulk_push(qid, account_id=ACCOUNT, messages=[
        {"body": "a", "content_type": "text"},
        {"body": {"n": 2}, "content_type": "json", "delay_seconds": 3600},
    ]))
    assert r.metadata.metrics.backlog_count == 4, r

    # Peek leases nothing; pull (with floats, as a Python caller may pass) leases.
    peeked = strict(MessagePeekResponse, m.peek(qid, account_id=ACCOUNT, batch_size=10.0))
    assert [p.body for p in peeked.messages][:1] == ["hello"] and peeked.messages[0].ref, peeked
    pulled = strict(MessagePullResponse, m.pull(qid, account_id=ACCOUNT, batch_size=10.0,
                                                visibility_timeout_ms=30000.0))
    msgs = pulled.messages
    assert [x.body for x in msgs] == ["hello", base64.b64encode(b'{"k":[1,2]}').decode(), "a"], msgs
    assert all(x.attempts == 1 and x.lease_id and len(x.id) == 32 for x in msgs), msgs
    assert msgs[0].metadata["CF-sourceMessageSource"] == "api", msgs[0].metadata
    assert msgs[1].metadata["CF-Content-Type"] == "json", msgs[1].metadata
    ack = strict(MessageAckResponse, m.ack(qid, account_id=ACCOUNT,
                                           acks=[{"lease_id": msgs[0].lease_id}],
                                           retries=[{"lease_id": msgs[1].lease_id, "delay_seconds": 0.0}]))
    assert (ack.ack_count, ack.retry_count) == (1, 1), ack
    again = strict(MessagePullResponse, m.pull(qid, account_id=ACCOUNT, batch_size=5))
    assert [x.attempts for x in again.messages] == [2], again
    metrics = strict(QueueGetMetricsResponse, q.get_metrics(qid, account_id=ACCOUNT))
    assert metrics.backlog_count == 3, metrics

    # Purge: one peeked message by its ref, then the whole queue.
    m.ack(qid, account_id=ACCOUNT, acks=[{"lease_id": x.lease_id} for x in again.messages + msgs[2:]])
    m.push(qid, account_id=ACCOUNT, body="purge me", content_type="text")
    ref = m.peek(qid, account_id=ACCOUNT, batch_size=1).messages[0].ref
    purged = strict(MessagePurgeResponse, m.purge(qid, account_id=ACCOUNT, refs=[{"ref": ref}]))
    assert not purged.warnings, purged
    strict(Queue, q.purge.start(qid, account_id=ACCOUNT, delete_messages_permanently=True))
    status = strict(PurgeStatusResponse, q.purge.status(qid, account_id=ACCOUNT))
    assert status.completed == "true", status
    assert q.get_metrics(qid, account_id=ACCOUNT).backlog_count == 0

    # Every documented error: the SDK's typed exception with Cloudflare's code.
    raises(cloudflare.NotFoundError, 10104, m.pull, "does-not-exist", account_id=ACCOUNT)
    raises(cloudflare.NotFoundError, 10104, m.push, "does-not-exist", account_id=ACCOUNT, body="x")
    raises(cloudflare.NotFoundError, 10104, m.pull, qid, account_id="ffffffffffffffffffffffffffffffff")
    raises(cloudflare.NotFoundError, 10104, q.list, account_id="ffffffffffffffffffffffffffffffff")
    raises(cloudflare.BadRequestError, 10204, m.push, qid, account_id=ACCOUNT, body="x" * 131072,
           content_type="text")
    raises(cloudflare.BadRequestError, 10204, m.push, qid, account_id=ACCOUNT, body="x" * 127901,
           content_type="text")
    m.push(qid, account_id=ACCOUNT, body="x" * 127900, content_type="text")
    raises(cloudflare.BadRequestError, 10205, m.bulk_push, qid, account_id=ACCOUNT,
           messages=[{"body": "x" * 100000, "content_type": "text"}] * 3)
    raises(cloudflare.BadRequestError, 10206, m.bulk_push, qid, account_id=ACCOUNT,
           messages=[{"body": i} for i in range(101)])
    raises(cloudflare.BadRequestError, 10203, m.push, qid, account_id=ACCOUNT, body="x",
           content_type="text", delay_seconds=86401)
    raises(cloudflare.BadRequestError, 10203, m.push, qid, account_id=ACCOUNT, body="x",
           content_type="text", delay_seconds=1.5)
    raises(cloudflare.BadRequestError, 10203, m.push, qid, account_id=ACCOUNT, body="x",
           content_type="yaml")
    raises(cloudflare.BadRequestError, 10202, m.bulk_push, qid, account_id=ACCOUNT,
           messages=[{"body": 1}], extra_body={"delay_seconds": 86401})
    raises(cloudflare.BadRequestError, 10207, m.pull, qid, account_id=ACCOUNT, batch_size=101)
    raises(cloudflare.BadRequestError, 10207, m.pull, qid, account_id=ACCOUNT, batch_size=2.5)
    raises(cloudflare.BadRequestError, 10207, m.pull, qid, account_id=ACCOUNT, visibility_timeout_ms=43200001)
    raises(cloudflare.BadRequestError, 10203, m.ack, qid, account_id=ACCOUNT,
           retries=[{"lease_id": "x", "delay_seconds": 86401}])
    raises(cloudflare.BadRequestError, 10207, m.push, qid, account_id=ACCOUNT, body=5, content_type="text")
    raises(cloudflare.BadRequestError, 10207, q.purge.start, qid, account_id=ACCOUNT,
           delete_messages_permanently=False)
    bad = Cloudflare(api_token="wrong", base_url=base, max_retries=0)
    raises(cloudflare.PermissionDeniedError, 10000, bad.queues.messages.pull, qid, account_id=ACCOUNT)
    raises(cloudflare.PermissionDeniedError, 10000, bad.queues.list, account_id=ACCOUNT)


if __name__ == "__main__":
    main(sys.argv[1])
