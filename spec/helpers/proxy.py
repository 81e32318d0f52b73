"""A TCP fault proxy for the specs, on 127.0.0.1 only.

    proxy.py LISTEN_PORT TARGET_PORT CONTROL_PORT DOWN_DELAY [peer]

Forwards every connection made to LISTEN_PORT to TARGET_PORT, and prints
"listening" once it accepts connections on both LISTEN_PORT and
CONTROL_PORT. DOWN_DELAY: seconds by which what the target sends reaches
the client late. With "peer", the proxy stands in front of an etcd member's
peer port and reads which member opened each connection (the
"X-Server-From" header of its first request: every raft stream, pipeline
and snapshot request carries the sender's member ID in hex).

Commands on CONTROL_PORT, one line per connection, answered "ok" once in
force (or with the figure asked for):

  blackhole          nothing more is forwarded either way, on open and on
                     new connections; nothing is refused, reset or closed,
                     and what is held is delivered once healed (a network
                     partition, or a NAT that forgot the connection)
  blackhole-from ID  the same, only for connections opened by member ID
  delay UP DOWN      seconds each chunk waits, client to target and target
                     to client
  cut                every open connection is reset (RST) on both sides;
                     new ones go through
  heal               no black hole, the delays it started with
  count              answers the number of open connections

One thread, non-blocking sockets: a reset is a close with SO_LINGER 0
that no other thread can hold up.
"""
import collections
import selectors
import socket
import struct
import sys
import time

LISTEN, TARGET, CONTROL = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
BASE_DOWN = float(sys.argv[4])
PEER = len(sys.argv) > 5 and sys.argv[5] == "peer"
HOST = "127.0.0.1"
CHUNK = 65536
HIGH_WATER = 1 << 20  # bytes held for one direction before reading stops
HEADER_LIMIT = 16384  # bytes of a peer connection read to find its sender

state = {"blackhole": False, "blocked": set(), "up": 0.0, "down": BASE_DOWN}
sel = selectors.DefaultSelector()
conns = set()


class Pipe:
    """One direction of a connection: what was read from src, each chunk
    stamped with when it came, waiting to be written to dst."""

    def __init__(self, conn, src, dst, delay_key):
        self.conn, self.src, self.dst, self.delay_key = conn, src, dst, delay_key
        self.queue = collections.deque()  # [came, bytes or None (EOF)]
        self.held = 0
        self.eof = False  # src said EOF (queued as None)
        self.done = False  # dst was shut for writing

    def due(self):
        """When the head may leave (None: nothing queued)."""
        if not self.queue:
            return None
        return self.queue[0][0] + state[self.delay_key]

    def read(self, now):
        try:
            data = self.src.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.conn.close(reset=False)
            return
        if not data:
            self.eof = True
            self.queue.append([now, None])
            return
        self.held += len(data)
        self.queue.append([now, data])
        if self.delay_key == "up" and self.conn.origin is None:
            self.conn.learn_origin(data)

    def write(self):
        item = self.queue[0]
        if item[1] is None:
            self.queue.popleft()
            self.done = True
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        try:
            sent = self.dst.send(item[1])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.conn.close(reset=False)
            return
        self.held -= sent
        if sent == len(item[1]):
            self.queue.popleft()
        else:
            item[1] = item[1][sent:]


class Conn:
    def __init__(self, client, upstream):
        self.client, self.upstream = client, upstream
        self.origin = None if PEER else ""  # "": no sender to tell
        self.head = b""
        self.up = Pipe(self, client, upstream, "up")
        self.down = Pipe(self, upstream, client, "down")
        self.masks = {}
        self.closed = False

    def learn_origin(self, data):
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0 and len(self.head) < HEADER_LIMIT:
            return
        self.origin = ""
        for line in self.head[: end if end >= 0 else len(self.head)].split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"x-server-from":
                self.origin = value.strip().decode("ascii", "replace").lower()
        self.head = b""

    def held_up(self):
        """Whether the black hole swallows this connection right now."""
        if state["blackhole"]:
            return True
        return bool(self.origin) and self.origin in state["blocked"]

    def arrange(self, now):
        """Sets what to wait for on each socket; returns the next moment a
        delayed chunk falls due (or None)."""
        if self.closed:
            return None
        if self.up.done and self.down.done:
            self.close(reset=False)
            return None
        held = self.held_up()
        wake = None
        want = {self.client: 0, self.upstream: 0}
        for pipe in (self.up, self.down):
            if not held and not pipe.eof and pipe.held < HIGH_WATER:
                want[pipe.src] |= selectors.EVENT_READ
            # a peer connection's first request is read before its sender
            # is known, and forwarded only once it is
            sendable = not held and (pipe is self.down or self.origin is not None)
            due = pipe.due()
            if sendable and due is not None:
                if due <= now:
                    want[pipe.dst] |= selectors.EVENT_WRITE
                elif wake is None or due < wake:
                    wake = due
        for sock, mask in want.items():
            old = self.masks.get(sock, 0)
            if mask == old:
                continue
            if old == 0:
                sel.register(sock, mask, self)
            elif mask == 0:
                sel.unregister(sock)
            else:
                sel.modify(sock, mask, self)
            self.masks[sock] = mask
        return wake

    def ready(self, sock, mask, now):
        if self.closed:
            return
        if mask & selectors.EVENT_READ:
            (self.up if sock is self.client else self.down).read(now)
        if not self.closed and mask & selectors.EVENT_WRITE:
            (self.down if sock is self.client else self.up).write()

    def close(self, reset):
        if self.closed:
            return
        self.closed = True
        conns.discard(self)
        for sock in (self.client, self.upstream):
            if self.masks.get(sock, 0):
                sel.unregister(sock)
            if reset:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            sock.close()


def accept(listener):
    try:
        client, _ = listener.accept()
    except OSError:
        return
    try:
        upstream = socket.create_connection((HOST, TARGET), timeout=2)
    except OSError:
        client.close()  # the target refuses: so does the proxy
        return
    for sock in (client, upstream):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conns.add(Conn(client, upstream))


def command(line):
    words = line.split()
    if not words:
        return "error: empty command"
    verb, args = words[0], words[1:]
    if verb == "blackhole" and not args:
        state["blackhole"] = True
    elif verb == "blackhole-from" and len(args) == 1:
        state["blocked"].add(args[0].lower())
    elif verb == "delay" and len(args) == 2:
        state["up"], state["down"] = float(args[0]), float(args[1])
    elif verb == "cut" and not args:
        for conn in list(conns):
            conn.close(reset=True)
    elif verb == "heal" and not args:
        state.update(blackhole=False, blocked=set(), up=0.0, down=BASE_DOWN)
    elif verb == "count" and not args:
        return str(len(conns))
    else:
        return "error: unknown command " + line.strip()
    return "ok"


def control(listener):
    try:
        sock, _ = listener.accept()
    except OSError:
        return
    with sock:
        sock.settimeout(5)
        data = b""
        try:
            while b"\n" not in data:
                more = sock.recv(1024)
                if not more:
                    break
                data += more
            reply = command(data.decode("ascii", "replace"))
            sock.sendall(reply.encode() + b"\n")
        except OSError:
            pass


def listen(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((HOST, port))
    s.listen(128)
    return s


def main():
    proxy_listener, control_listener = listen(LISTEN), listen(CONTROL)
    sel.register(proxy_listener, selectors.EVENT_READ, "accept")
    sel.register(control_listener, selectors.EVENT_READ, "control")
    print("listening", flush=True)
    while True:
        now = time.monotonic()
        wake = None
        for conn in list(conns):
            due = conn.arrange(now)
            if due is not None and (wake is None or due < wake):
                wake = due
        timeout = None if wake is None else max(0.0, wake - now)
        for key, mask in sel.select(timeout):
            now = time.monotonic()
            if key.data == "accept":
                accept(key.fileobj)
            elif key.data == "control":
                control(key.fileobj)
            else:
                key.data.ready(key.fileobj, mask, now)


main()
