"""Shared config texts for the config tests."""

from __future__ import annotations

import pytest

#: The canonical 3-node lab config, as the lab generates it for n1.
LAB_N1 = """\
cluster {
  name = "dvl"
  node_name = "n1"
  gossip_address = "10.1.0.11:4801"
  peers = ( "10.1.0.12:4801" "10.1.0.13:4801" )
  keyring = "/tmp/dvl/keyring"
  profile = "fast"
  view_mature_time = 1
  arp_all_hosts = true
  unconditional_rebind = true
  quorum = "none"
  Topology "10.1.1.0/24" { cidrmask = 32 interface = "eth1" }
  Topology "10.1.2.0/24" { interface = "eth1" }
}
use_iflist_cache = false
Spool { path = "/tmp/dvl/n1/spool" }
Control_Listener { Listen "/tmp/dvl/n1/control.sock" { mode = "0600" } }
ECCluster_Listener { Listen "10.1.0.11:4802" { } }
Delivery { smarthost = "10.1.0.3:25" }
Metrics { Listen "10.1.0.11:9100" }
ESMTP_Listener {
  Listen "10.1.1.1:25" { Enable_Duravip = true }
  Listen "10.1.1.2:25" { Enable_Duravip = true }
  Listen "10.1.1.3:25" { Enable_Duravip = true }
  Listen "10.1.2.1:25" { Duravip_Follow = "duravip-1" }
  Listen "10.1.0.11:25" { }
}
Binding "duravip-1" { Enable_Duravip = true  Bind_Address = "10.1.1.1"  Duravip_Preference = "n1" }
Binding "duravip-2" { Enable_Duravip = true  Bind_Address = "10.1.1.2"  Duravip_Preference = "n2" }
Binding "duravip-3" { Enable_Duravip = true  Bind_Address = "10.1.1.3"  Duravip_Preference = "n3" }
Binding_Group "pool" {
  Binding "pool-a" { Enable_Duravip = true Bind_Address = "10.1.1.11" }
  Binding "pool-b" { Enable_Duravip = true Bind_Address = "10.1.1.12" }
}
"""

#: Four lines: a valid cluster block covering 10.1.0.0/16 on eth1 (lines 1-4).
HEADER = """\
cluster { name = "t" node_name = "n1" gossip_address = "10.0.0.1:4801"
  keyring = "/k"
  Topology "10.1.0.0/16" { interface = "eth1" }
}
"""


@pytest.fixture
def lab_n1() -> str:
    return LAB_N1


@pytest.fixture
def header() -> str:
    return HEADER
