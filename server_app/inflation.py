"""A client's reply is sized, and refused if too large, before Flower rebuilds it from its objects.

Why: since Flower 1.20 a message travels as a tree of content-addressed objects (message, record dict, records,
``Array``, ``ArrayChunk``), each unique object once. An ``Array``'s body lists its chunks by *reference*, and one
chunk may be listed any number of times (an honest array of zeros does that). Rebuilding the ``Array``
(``Array.inflate``) concatenates one copy of the chunk per reference. So a reply of a few tens of kilobytes on the
wire (one small chunk, and a long list of references to it) becomes hundreds of megabytes or gigabytes in the
ServerApp. In deployment that happens inside Flower's ``HttpGrid.pull_messages`` (the ServerApp's grid: it pulls
every unique object of a reply, then calls ``inflate_object_from_contents``), before any of our checks,
``UpdateGuard.admit`` included, sees the reply.

``BoundedGrid`` wraps that grid and does what its ``pull_messages`` does (the same Runtime API calls and Flower
functions) with two bounds per reply, both the guard's limit (``UpdateGuard.max_bytes``, given by
``app.run_experiment``):

1. while pulling: the bytes of the reply's unique objects are counted as they arrive; past the limit the pull
   stops (no honest reply is larger than its admission limit);
2. before inflating: ``inflated_bytes`` reads only the object heads and the ``Array`` bodies (chunk references)
   and sums the chunk bytes every reference will copy; past the limit the reply is not inflated.

A reply refused either way, or whose object tree is malformed (a missing object, a chunk reference past the
chunk list: inside Flower's inflation that raises and ends the whole pull, hence the run), becomes an error reply
from the SuperLink's node id with code ``REPLY_REFUSED``; ``Intake.read`` records it as ``rejected`` with the
reason, and its node gets new work. Its objects are confirmed received so the SuperLink deletes them.

The in-process grids (Flower's simulation ``InMemoryGrid``, ``server_app.local_grid.LocalGrid``) hand over reply
objects that were never deflated, so nothing is inflated there, and their ClientApps run in this process anyway:
``bounded`` leaves them as they are.

What the ServerApp cannot bound: one object is read whole by the HTTP client before it can be counted (at most
``FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS`` objects at once, 2 by default), and Flower's SuperLink does not cap an
object's size. The deployment kit caps the SuperLink's service, ServerApp included, with ``MemoryMax``
(``deploy/systemd/staleflower-superlink.service``; RELIABILITY.md, "Replies that inflate").

Written against Flower 1.41.0's ``HttpGrid`` (pinned in pyproject.toml); it uses that grid's Runtime API client
(``_runtime_client``), its only private attribute.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import httpx
from flwr.app import Array, Error, Message, Metadata, RecordDict
from flwr.app.message import make_message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest, ObjectTree  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
from flwr.supercore.date import now
from flwr.supercore.inflatable.inflatable_object import (
    get_object_body,
    get_object_head_values_from_object_content,
    iterate_object_tree,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, inflate_object_from_contents, pull_objects
from flwr.supercore.run import Run

if TYPE_CHECKING:
    from flwr.superlink.grid import HttpGrid

__all__ = ["REPLY_REFUSED", "BoundedGrid", "Refused", "bounded", "inflated_bytes", "is_refused"]

log = logging.getLogger("staleflower")

#: Error code of a reply the ServerApp refused to inflate (Flower's own codes, ``ErrorCode``, are 0 to 8).
REPLY_REFUSED = 4013
PULL_INTERVAL_S = 0.2  # send_and_receive's polling; our engine pushes and pulls itself


class Refused(Exception):
    """A reply that must not be inflated; the message is the reason the store records."""


def bounded(grid: Grid, limit: int) -> Grid:
    """``grid`` with each reply bounded to ``limit`` bytes before inflation, where the grid inflates replies."""
    # A grid whose class was never imported is no HttpGrid: in-process runs skip that package's imports (Flower's
    # SQL state, about 2 s of start-up).
    http = sys.modules.get("flwr.superlink.grid.http_grid")
    return BoundedGrid(grid, limit) if http is not None and isinstance(grid, http.HttpGrid) else grid


def is_refused(reply: Message) -> bool:
    """Whether ``reply`` is ``BoundedGrid``'s refusal (not an error a client sent: those come from its node)."""
    return (reply.has_error() and reply.error.code == REPLY_REFUSED
            and reply.metadata.src_node_id == SUPERLINK_NODE_ID)


def inflated_bytes(root: str, contents: Mapping[str, bytes]) -> tuple[int, int, int]:
    """``(array bytes, chunk references, unique chunks)`` that inflating the tree at ``root`` would produce.

    Array bytes are the sum, over each unique ``Array`` object (inflation builds an object once however often it
    is referenced), of the body length of every chunk its body references, repeats included: exactly what
    ``Array.inflate`` allocates. Only object heads and ``Array`` bodies are read. Raises ``Refused`` on a tree
    that Flower's inflation would fail on (a missing object, an ``Array`` child that is not a chunk, a reference
    past the chunk list).
    """
    total = refs = 0
    chunks: set[str] = set()
    seen: set[str] = set()
    stack = [root]
    while stack:  # iterative: a hostile tree's depth costs no recursion
        oid = stack.pop()
        if oid in seen:
            continue
        seen.add(oid)
        if oid not in contents:
            raise Refused(f"malformed reply: object {oid[:12]} of its tree was not sent")
        obj_type, children, _ = get_object_head_values_from_object_content(contents[oid])
        stack.extend(children)
        if obj_type != "Array":
            continue
        sizes = [_chunk_size(contents, c) for c in children]
        ids = json.loads(get_object_body(contents[oid], Array))["arraychunk_ids"]
        for index, count in Counter(ids).items():
            if not (isinstance(index, int) and 0 <= index < len(sizes)):
                raise Refused(f"malformed reply: an Array references chunk {str(index)[:20]} of {len(sizes)}")
            total += count * sizes[index]
            refs += count
        chunks.update(children)
    return total, refs, len(chunks)


def _chunk_size(contents: Mapping[str, bytes], oid: str) -> int:
    """Body length of chunk ``oid`` (from its head), or ``Refused`` when it is missing or no ``ArrayChunk``."""
    if oid not in contents:
        raise Refused(f"malformed reply: chunk {oid[:12]} of its tree was not sent")
    obj_type, _, size = get_object_head_values_from_object_content(contents[oid])
    if obj_type != "ArrayChunk":
        raise Refused(f"malformed reply: an Array's child is a {obj_type[:40]}, not an ArrayChunk")
    return size


class BoundedGrid(Grid):
    """Flower's ``HttpGrid`` whose ``pull_messages`` refuses a reply larger than ``limit`` before inflating it."""

    def __init__(self, grid: HttpGrid, limit: int) -> None:
        self.grid, self.limit = grid, limit

    # Everything but pulling is the wrapped grid's ----------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        """Set the run of the wrapped grid."""
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """The wrapped grid's run."""
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """Deprecated in Flower; the wrapped grid's."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """The wrapped grid's node ids."""
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        """The wrapped grid's nodes."""
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push through the wrapped grid (what we send is ours: nothing to bound)."""
        return self.grid.push_messages(messages)

    def close(self) -> None:
        """Close the wrapped grid."""
        self.grid.close()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull (bounded) until every reply is in or ``timeout`` passes."""
        waiting = {i for i in self.push_messages(messages) if i}
        out: list[Message] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while waiting and (deadline is None or time.monotonic() < deadline):
            got = self.pull_messages(waiting)
            out.extend(got)
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if waiting and not got:
                time.sleep(PULL_INTERVAL_S)
        return out

    # Pulling: HttpGrid.pull_messages with the two bounds --------------------------------------------------------
    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` that arrived: each inflated, or refused with its reason."""
        client = self.grid._runtime_client  # noqa: SLF001  (see the module docstring)
        try:
            res = client.PullMessages(PullAppMessagesRequest(message_ids=list(message_ids)))
        except httpx.HTTPStatusError as exc:  # as HttpGrid: a response too large for the Runtime API is no reply
            if exc.response.status_code == httpx.codes.REQUEST_ENTITY_TOO_LARGE:
                log.error("pulling replies: the SuperLink's response was too large (HTTP 413)")
                return []
            raise
        return [self._one(proto, tree) for proto, tree in zip(res.messages_list, res.message_object_trees,
                                                              strict=True)]

    def _one(self, proto: ProtoMessage, tree: ObjectTree) -> Message:
        client, run_id = self.grid._runtime_client, self.grid.run.run_id  # noqa: SLF001
        msg_id = proto.metadata.message_id
        fetch = make_pull_object_fn_protobuf(pull_object_protobuf=client.PullObject, node=self.grid.node,
                                             run_id=run_id)
        pulled, lock = [0], threading.Lock()

        def counted(object_id: str) -> bytes:
            content = fetch(object_id)
            with lock:
                pulled[0] += len(content)
                if pulled[0] > self.limit:
                    raise Refused(f"oversized reply: {pulled[0]} bytes of its objects pulled so far, more than "
                                  f"the limit of {self.limit}; refused while pulling it")
            return content

        def confirm() -> None:  # the SuperLink may delete the reply's objects
            client.ConfirmMessageReceived(ConfirmMessageReceivedRequest(node=self.grid.node, run_id=run_id,
                                                                        message_object_id=msg_id))

        try:
            contents = pull_objects([t.object_id for t in iterate_object_tree(tree)], counted)
        except ObjectPullError as exc:  # as HttpGrid: objects missing or never uploaded
            return self._error(proto, ErrorCode.MESSAGE_UNAVAILABLE, f"Reply message objects are unavailable. {exc}")
        except Refused as exc:
            confirm()
            return self._refuse(proto, str(exc))
        confirm()
        try:
            size, refs, unique = inflated_bytes(msg_id, contents)
            if size > self.limit:
                raise Refused(f"oversized reply: its arrays inflate to {size} bytes ({refs} chunk references to "
                              f"{unique} unique chunks, {pulled[0]} bytes sent), more than the limit of "
                              f"{self.limit}; refused before inflating it")
            message = inflate_object_from_contents(msg_id, contents)
            if not isinstance(message, Message):
                raise Refused(f"malformed reply: its root object is a {type(message).__name__}, not a Message")
        except Refused as exc:
            return self._refuse(proto, str(exc))
        except Exception as exc:  # inside Flower's inflation: this reply only, never the whole pull
            what = f"{type(exc).__name__}: {str(exc)[:200]}"  # Flower's messages may list every object id
            return self._refuse(proto, f"malformed reply (sizing or inflating it raised {what})")
        message.metadata.__dict__["_message_id"] = msg_id
        return message

    def _refuse(self, proto: ProtoMessage, reason: str) -> Message:
        log.warning("refused the reply to message %s from node %d: %s", proto.metadata.reply_to_message_id,
                    proto.metadata.src_node_id, reason)
        return self._error(proto, REPLY_REFUSED, reason)

    def _error(self, proto: ProtoMessage, code: int, reason: str) -> Message:
        """An error reply in place of ``proto``'s, as HttpGrid makes one for a reply it could not pull."""
        node = self.grid.node.node_id
        meta = Metadata(run_id=self.grid.run.run_id, message_id="", src_node_id=node, dst_node_id=node,
                        message_type=SYSTEM_MESSAGE_TYPE, group_id="", ttl=0,
                        reply_to_message_id=proto.metadata.reply_to_message_id, created_at=now().timestamp())
        return make_message(metadata=meta, error=Error(code=code, reason=reason))
