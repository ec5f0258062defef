"""The Supabase Realtime protocol on one socket: a ``Connection`` and its ``Channel``s.

Transport-agnostic. A connection reads client messages (``parse``, then
``handle_message``) and writes server frames through its ``Wire``, which is either the
native WebSocket server (``wsserver``: each frame written straight to the socket) or any
ASGI server (``websocket.py``: a bounded queue drained by a writer task). One ``Gateway``
per process holds the connections, and one timer for all of them expires tokens and
drops sockets that went silent (no task per connection).

Row events come from the hub's router through ``Channel.offer``: a recipient's frame is
built once per event for every recipient on the same wire, topic, binding ids and vsn
(most recipients of one event share it byte for byte). The join reply goes out before
any row event, and "Subscribed to PostgreSQL" only once the subscription is registered,
so it is true when sent: a change committed after it is delivered. A resume's missed
events follow it, replayed page by page as the client reads (``Hub.catch_up``), then
what committed meanwhile, then live events.

One module per job, as centrifuge keeps its hub, client, broker and presence apart, so a
change to one does not mean reading the others:

- ``process``: the ``Gateway``, what a process's sockets share, and its timer;
- ``limits``: how much a process and a connection may do;
- ``wire``: what a connection asks of the transport that writes its frames;
- ``contracts``: what the jobs ask of a connection, the gateway and a channel (protocols,
  so no job imports the module that imports it);
- ``access``: who may open a socket and join a channel, and until when (tokens);
- ``connection``: one socket: its state, what it sends, its tasks, its end;
- ``inbox``: a client's frames, answered, rate-limited and dispatched in order;
- ``join``: joining a channel (subscription, resume, reply order) and leaving it;
- ``channel``: one joined topic, where its row events, broadcasts and presence arrive;
- ``broadcast_presence``: a client's broadcasts and presence track and untrack.

The names the transports, the app and the tests use are re-exported here.
"""

from autodispatch.realtime.gateway.access import Refusal as Refusal
from autodispatch.realtime.gateway.access import admit as admit
from autodispatch.realtime.gateway.channel import Channel as Channel
from autodispatch.realtime.gateway.connection import Connection as Connection
from autodispatch.realtime.gateway.limits import Limits as Limits
from autodispatch.realtime.gateway.process import Gateway as Gateway
from autodispatch.realtime.gateway.wire import CLOSE_CODES as CLOSE_CODES
from autodispatch.realtime.gateway.wire import CONTROL_ROOM as CONTROL_ROOM
from autodispatch.realtime.gateway.wire import SLOW_CONSUMER as SLOW_CONSUMER
from autodispatch.realtime.gateway.wire import Wire as Wire
from autodispatch.realtime.gateway.wire import WriteBatch as WriteBatch
