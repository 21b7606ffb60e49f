"""A ClientApp function for tests/test_process_executor.py, in a module of its own so that worker processes import
it by name (``tests.process_clients:counting``) without importing the test module and what it imports."""

import os
import sys
import time

from flwr.app import Context, Message, MetricRecord, RecordDict


def counting(msg: Message, context: Context) -> Message:
    """Count the node's messages in its Context; ``query.boom`` raises; ``query.sleep`` sleeps (a stuck client);
    ``query.nap`` sleeps 0.5 s; ``query.exit`` calls ``sys.exit(3)``; ``query.spoof`` replies naming another
    message."""
    if msg.metadata.message_type == "query.boom":
        raise RuntimeError("boom")
    if msg.metadata.message_type == "query.sleep":
        time.sleep(60)
    if msg.metadata.message_type == "query.nap":
        time.sleep(0.5)
    if msg.metadata.message_type == "query.exit":
        sys.exit(3)
    seen = int(context.state["count"]["n"]) + 1 if "count" in context.state else 1
    context.state["count"] = MetricRecord({"n": seen})
    reply = Message(RecordDict({"count": MetricRecord({"n": seen, "pid": os.getpid()})}), reply_to=msg)
    if msg.metadata.message_type == "query.spoof":  # a reply that names another message
        reply.metadata.__dict__["_reply_to_message_id"] = "another-message"
    return reply


def garbling(msg: Message, context: Context) -> Message:
    """Answer ``query.garble`` as ``counting`` does, but make its worker write the reply as bytes no decoder takes."""
    if msg.metadata.message_type == "query.garble":
        import server_app.client_processes as worker  # noqa: PLC0415 - this worker's own module, patched in place

        worker.to_bytes = lambda reply: b"\xff not a message"
    return counting(msg, context)
