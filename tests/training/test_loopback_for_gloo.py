"""``runtime.parallel.loopback_for_gloo``: a world of one process of our own binds gloo to the loopback interface
(no host-name resolution), and a ``GLOO_SOCKET_IFNAME`` the user set is kept."""

import os
import socket

from nemo_mla_lora.runtime import parallel


def test_one_process_world_uses_the_loopback(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    parallel.loopback_for_gloo()
    chosen = os.environ["GLOO_SOCKET_IFNAME"]
    assert chosen in {name for _, name in socket.if_nameindex()} and chosen.startswith("lo")


def test_a_users_interface_is_kept(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    parallel.loopback_for_gloo()
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth7"
