"""The realtime WebSocket served straight on the socket, as uvicorn's WebSocket protocol.

``autodispatch serve`` gives uvicorn ``protocol_for(gateway)`` as its ``ws`` protocol
class. An upgrade to ``/realtime/v1/websocket`` or ``/socket/websocket`` is then handled
here, without ASGI: no task, queue or event per connection, and a row event costs each
recipient one ``transport.write`` of frame bytes built once for everyone on the same
topic, binding ids and vsn (server frames are unmasked, so they are the same bytes for
every recipient). Any other upgrade goes to uvicorn's own protocol, and through ASGI to
the app. The protocol itself (joins, channels, limits) is the ``gateway`` package,
shared with the ASGI routes of ``websocket.py``.

Incoming frames are parsed by the ``websockets`` package's sans-I/O ``ServerProtocol``
(handshake, masking, fragments, ping/pong, the closing handshake). Outgoing data frames
are written here; while the reader routes a batch of events (``gateway.WriteBatch``),
each connection's frames are gathered and written with one call.

Backpressure: the transport buffers what the kernel does not take yet; past its high
water mark frames wait in a backlog of at most ``Limits.queue_size`` frames. A write
that finds the backlog full fails, the reader then waits (up to
``slow_consumer_seconds``) for room, and a client that still has not read is closed
with 4000 ``slow_consumer``; it resumes from its cursor and loses nothing.

One module per job: ``server`` (``RealtimeWebSocket``, the protocol uvicorn runs, which
composes the others), ``handshake`` (which upgrades are ours, admitted or refused),
``reading`` (frames parsed, messages put together and handed to the connection) and
``writing`` (the socket's wire: frames, backlog, batched writes, the close).
"""

from autodispatch.realtime.wsserver.server import RealtimeWebSocket as RealtimeWebSocket
from autodispatch.realtime.wsserver.server import protocol_for as protocol_for
from autodispatch.realtime.wsserver.writing import frame_bytes as frame_bytes
