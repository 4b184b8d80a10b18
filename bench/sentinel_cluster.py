"""One Redis master, one replica and three sentinels on loopback, with a password.

Used by ``tests/test_sentinel.py`` and ``python -m bench.chaos --sentinel``. Needs
Debian's ``redis-server`` and ``redis-sentinel`` on the PATH.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.workload import free_port, wait_for

# The sentinels' timing: the README quotes the resume time with these.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 10_000


def _free_port() -> int:
    return free_port()


@dataclass
class SentinelCluster:
    """One master, one replica and three sentinels on loopback, with a password."""

    root: Path
    password: str
    master_name: str = "mymaster"
    master_port: int = field(default_factory=_free_port)
    replica_port: int = field(default_factory=_free_port)
    sentinel_ports: list[int] = field(default_factory=lambda: [_free_port() for _ in range(3)])
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """REDIS_URL: every sentinel, the master's password and database 0 on each."""
        return ";".join(
            f"sentinel://:{self.password}@127.0.0.1:{port}/0" for port in self.sentinel_ports
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.root / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.root
            )

    def _server(self, name: str, port: int, *extra: str) -> None:
        data = self.root / name
        data.mkdir()
        self._spawn(
            name,
            [
                str(shutil.which("redis-server")),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(data),
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxmemory-policy",
                "noeviction",
                "--requirepass",
                self.password,
                "--masterauth",
                self.password,
                *extra,
            ],
        )

    def start(self) -> None:
        """Start everything; return once the sentinels agree on the master and its replica."""
        self._server("master", self.master_port)
        self._server(
            "replica", self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port)
        )
        with self.client(self.replica_port) as replica:
            wait_for(
                lambda: replica.info("replication").get("master_link_status") == "up", timeout=30
            )
        for n, port in enumerate(self.sentinel_ports):
            conf = self.root / f"sentinel-{n}.conf"
            conf.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f'dir "{self.root}"\n'
                f"sentinel monitor {self.master_name} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel auth-pass {self.master_name} {self.password}\n"
                f"sentinel down-after-milliseconds {self.master_name} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {self.master_name} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {self.master_name} 1\n"
            )
            self._spawn(f"sentinel-{n}", [str(shutil.which("redis-sentinel")), str(conf)])
        for port in self.sentinel_ports:
            with self.client(port, auth=False) as sentinel:
                wait_for(lambda s=sentinel: self._sees_everyone(s), timeout=45, interval=0.1)

    def _sees_everyone(self, sentinel: redis.Redis) -> bool:
        try:
            state = sentinel.sentinel_master(self.master_name)
        except redis.RedisError:
            return False
        return bool(state["num-slaves"] >= 1 and state["num-other-sentinels"] >= 2)

    def client(self, port: int, *, auth: bool = True) -> redis.Redis:
        """A direct client of one server (a sentinel: ``auth=False``, it has no password)."""
        return redis.Redis(
            port=port,
            password=self.password if auth else None,
            decode_responses=True,
            socket_timeout=2,
        )

    def master_port_now(self) -> int | None:
        """The master's port as the first sentinel that answers names it."""
        for port in self.sentinel_ports:
            with (
                self.client(port, auth=False) as sentinel,
                contextlib.suppress(redis.RedisError),
            ):
                address = sentinel.sentinel_get_master_addr_by_name(self.master_name)
                return int(address[1]) if address else None
        return None

    def kill_master(self) -> None:
        """SIGKILL the master: a real failure, with commands in flight."""
        proc = self.procs["master"]
        proc.kill()
        proc.wait(timeout=10)

    def restart_killed(self) -> None:
        """Start the SIGKILLed master again; the sentinels make it a replica of the new
        master. Returns once it replicates and every sentinel counts it."""
        old_port = self.master_port
        new_port = self.master_port_now()
        assert new_port is not None
        assert new_port != old_port
        name = f"server-{old_port}-{len(self.procs)}"
        self._server(name, old_port, "--replicaof", "127.0.0.1", str(new_port))
        self.procs["master"], self.procs["replica"] = self.procs["replica"], self.procs[name]
        self.master_port, self.replica_port = new_port, old_port
        with self.client(old_port) as replica:
            wait_for(
                lambda: replica.info("replication").get("master_link_status") == "up", timeout=60
            )
        for port in self.sentinel_ports:
            with self.client(port, auth=False) as sentinel:
                wait_for(lambda s=sentinel: self._sees_everyone(s), timeout=60, interval=0.1)

    def stop(self) -> None:
        """Stop every process that still runs."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
