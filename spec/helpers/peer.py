"""Wrong peers for the specs: something on 127.0.0.1 that is not etcd.

    peer.py MODE PORTFILE

listens on a free port of 127.0.0.1, writes the port to PORTFILE once it
accepts connections, and serves until killed. MODE:

  silent    accepts and never sends a byte
  random    answers every connection with random bytes
  close     closes every connection as soon as it is accepted
  grpc      a real gRPC server (python3-grpcio) with a service that is not
            etcd: every etcd method is an unknown one to it
  deep-txn  a gRPC server answering etcd's KV.Txn with a TxnResponse nested
            thousands of levels deep (a reply that once overflowed the
            client's C stack)
"""
import os
import socket
import sys
import threading
import time

MODE, PORTFILE = sys.argv[1], sys.argv[2]


def announce(port):
    tmp = PORTFILE + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % port)
    os.rename(tmp, PORTFILE)


def drain(conn):
    # reads and drops whatever the client sends, until it hangs up
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass
    conn.close()


def silent(conn):
    drain(conn)


def random_bytes(conn):
    try:
        conn.sendall(os.urandom(16384))
    except OSError:
        pass
    drain(conn)


def close(conn):
    conn.close()


def late_close(conn):
    # holds the connection mid-handshake for a second, then hangs up
    time.sleep(1)
    conn.close()


def tcp(handler):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    announce(srv.getsockname()[1])
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()


def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def deep_txn_response(depth):
    # TxnResponse.responses (field 3) holds a ResponseOp whose response_txn
    # (field 4) is the next TxnResponse, built from the inside out
    parts = []
    size = 0
    for _ in range(depth):
        op_len = size
        op_head = b"\x22" + varint(op_len)
        size = op_len + len(op_head)
        resp_head = b"\x1a" + varint(size)
        size += len(resp_head)
        parts.append(resp_head + op_head)
    return b"".join(reversed(parts))


def grpc_server(methods):
    import grpc
    from concurrent import futures

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            answer = methods.get(details.method)
            if answer is None:
                return None  # gRPC answers UNIMPLEMENTED
            # no (de)serializers: requests and replies are raw bytes
            return grpc.unary_unary_rpc_method_handler(lambda req, ctx: answer)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[Handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    announce(port)
    while True:
        time.sleep(3600)


if MODE == "silent":
    tcp(silent)
elif MODE == "random":
    tcp(random_bytes)
elif MODE == "close":
    tcp(close)
elif MODE == "late-close":
    tcp(late_close)
elif MODE == "grpc":
    grpc_server({"/peer.Greeter/Hello": b""})
elif MODE == "deep-txn":
    grpc_server({"/etcdserverpb.KV/Txn": deep_txn_response(50000)})
else:
    sys.exit("unknown mode " + MODE)
