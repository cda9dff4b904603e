"""A small cluster on one machine: each host a Linux network namespace with an address of its
own, wired to a bridge by a veth pair (the test process reaches them through the bridge). Needs
root (CI runs as root); ``Network.make`` raises ``NetnsUnavailable`` where namespaces cannot be
made, for the tests to skip."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

SUBNET = "10.213.{}"  # .0/24 of one network; .1 is the bridge, hosts from .2


class NetnsUnavailable(RuntimeError):
    pass


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    veth: str  # the bridge's end of its link

    @property
    def prefix(self) -> tuple[str, ...]:
        """What runs a command on this host."""
        return ("ip", "netns", "exec", self.namespace)


@dataclass
class Network:
    tag: str
    subnet: str
    bridge: str
    hosts: dict[str, Host] = field(default_factory=dict)

    @classmethod
    @contextlib.contextmanager
    def make(cls, names: list[str]) -> Iterator[Network]:
        """A bridge and one namespace per name, removed on exit whatever happened."""
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        tag = secrets.token_hex(2)
        net = cls(tag, SUBNET.format(int(tag, 16) % 200 + 20), f"pdbr{tag}")
        try:
            net._add_bridge()
            for i, name in enumerate(names):
                net._add_host(name, i)
            yield net
        except subprocess.CalledProcessError as e:
            raise NetnsUnavailable(f"`{' '.join(e.cmd)}` failed: {e.stderr.strip()}") from e
        finally:
            net.remove()

    def _add_bridge(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def _add_host(self, name: str, index: int) -> None:
        host = Host(name, f"pd{self.tag}-{name}", f"{self.subnet}.{index + 2}", f"pdv{self.tag}{index}")
        self.hosts[name] = host
        ip("netns", "add", host.namespace)
        ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
        ip("link", "set", host.veth, "master", self.bridge, "up")
        inside = ("-n", host.namespace)
        ip(*inside, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip(*inside, "link", "set", "eth0", "up")
        ip(*inside, "link", "set", "lo", "up")

    def cut(self, name: str) -> None:
        """Remove ``name``'s link: its host is still running, but nothing reaches it."""
        ip("link", "del", self.hosts[name].veth)

    def remove(self) -> None:
        for host in self.hosts.values():
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True, timeout=30)
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)
