"""Programs that run as pod processes on the devcluster node during benchmarks."""

# Reads until EOF, then answers the number of bytes received (8 bytes, big-endian).
SINK_SERVER = r"""
import socket, sys, threading
def serve(conn):
    with conn:
        total = 0
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            total += len(data)
        conn.sendall(total.to_bytes(8, "big"))
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(16)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""
