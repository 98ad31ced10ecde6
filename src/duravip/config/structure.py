"""Raw stanza tree -> :class:`Config`: the sections, their keys, defaults and presets.

Every problem is collected as a :class:`Diagnostic` instead of stopping at the
first, so ``check-config`` shows the operator everything in one run. Source
positions of keys the model classes do not carry are kept in a side table
(:data:`Locs`) for the validator. Reading values and blocks generically is
:mod:`~duravip.config.reader`; the derived DuraVIPs are
:mod:`~duravip.config.derive`.
"""

from __future__ import annotations

import socket
import typing
from pathlib import Path
from typing import Any, Final

import attrs

from duravip.config.derive import derive
from duravip.config.diagnostics import Diagnostic
from duravip.config.model import (
    PRESETS,
    Binding,
    BindingGroup,
    ClusterConfig,
    Config,
    ControlConfig,
    DeliveryConfig,
    HealthCheck,
    HostPort,
    Listener,
    MetricsConfig,
    SmtpLimits,
    SourceLoc,
    SpoolConfig,
    Timers,
    Topology,
)
from duravip.config.parser import Document, Stanza
from duravip.config.reader import MISSING, Locs, StanzaReader, field_types
from duravip.ipaddr import IPNetwork

__all__ = ["TOP_STANZAS", "Locs", "structure"]

_TIMER_TYPES: Final = field_types(Timers)
_CLUSTER_TYPES: Final = {
    k: v for k, v in field_types(ClusterConfig).items() if k not in ("timers", "topology")
} | _TIMER_TYPES
_TOPOLOGY_TYPES: Final = {"cidrmask": int, "interface": str}
_LISTENER_TYPES: Final = {k: v for k, v in field_types(Listener).items() if k != "address"}
_BINDING_TYPES: Final = {
    k: v for k, v in field_types(Binding).items() if k not in ("name", "group")
}
_SPOOL_TYPES: Final = field_types(SpoolConfig)
_DELIVERY_TYPES: Final = field_types(DeliveryConfig)
_SMTP_TYPES: Final = field_types(SmtpLimits)
_CONTROL_LISTEN_TYPES: Final = {"mode": int, "group": str}
_TOP_TYPES: Final = {"use_iflist_cache": bool}
_HEALTH_TYPES: Final = {
    ("type" if k == "kind" else k): v
    for k, v in field_types(HealthCheck).items()
    if k != "name"
}

#: Canonical spellings, used in "did you mean" hints and docs.
TOP_STANZAS: Final = (
    "cluster",
    "Spool",
    "Control_Listener",
    "ECCluster_Listener",
    "Delivery",
    "Metrics",
    "Smtp_Limits",
    "ESMTP_Listener",
    "Binding",
    "Binding_Group",
    "Health_Check",
)


class _Structurer(StanzaReader):
    """One document's sections, read in order."""

    def __init__(self, doc: Document, node_name: str | None) -> None:
        super().__init__()
        self.doc = doc
        self.node_name = node_name

    # -- stanzas -----------------------------------------------------------
    def run(self) -> tuple[Config | None, Locs, list[Diagnostic]]:
        top_values, top = self.items(self.doc.items, _TOP_TYPES, TOP_STANZAS, (), "the file")
        groups: dict[str, list[Stanza]] = {s.lower(): [] for s in TOP_STANZAS}
        for st in top:
            groups[st.name.lower()].append(st)

        cluster = self.cluster(self.single(groups["cluster"], "cluster"))
        spool = self.simple(groups["spool"], "Spool", _SPOOL_TYPES, SpoolConfig, ("spool",))
        delivery = self.simple(
            groups["delivery"], "Delivery", _DELIVERY_TYPES, DeliveryConfig, ("delivery",)
        )
        smtp = self.simple(groups["smtp_limits"], "Smtp_Limits", _SMTP_TYPES, SmtpLimits, ("smtp",))
        control = self.control(self.single(groups["control_listener"], "Control_Listener"))
        ecc = self.one_listen(self.single(groups["eccluster_listener"], "ECCluster_Listener"))
        metrics = self.one_listen(self.single(groups["metrics"], "Metrics"))
        listeners = self.listeners(groups["esmtp_listener"])
        bindings: list[Binding] = []
        group_list: list[BindingGroup] = []
        for st in groups["binding"]:
            b = self.binding(st, None, len(bindings))
            if b is not None:
                bindings.append(b)
        for st in groups["binding_group"]:
            g = self.group(st, bindings)
            if g is not None:
                group_list.append(g)
        health = [h for i, st in enumerate(groups["health_check"]) if (h := self.health(st, i))]
        if any(d.is_error for d in self.diags) or cluster is None:
            return None, self.locs, self.diags
        held = {cluster.gossip_address.host}
        held.update(hp.host for hp in (ecc, metrics) if hp is not None)
        listeners, bindings, duravips, notes = derive(listeners, bindings, cluster, held)
        self.diags.extend(notes)
        config = Config(
            cluster=cluster,
            use_iflist_cache=top_values.get("use_iflist_cache", False),
            spool=spool,
            control=control,
            cluster_listener=ecc,
            delivery=delivery,
            smtp=smtp,
            metrics=MetricsConfig(listen=metrics),
            listeners=tuple(listeners),
            bindings=tuple(bindings),
            groups=tuple(group_list),
            health=tuple(health),
            source=self.doc.source,
            duravips=duravips,
        )
        return config, self.locs, self.diags

    def simple(
        self, stanzas: list[Stanza], name: str, keys: dict[str, Any], cls: Any, path: tuple[str]
    ) -> Any:
        st = self.single(stanzas, name)
        if st is None:
            return cls()
        self.locs[path] = st.loc
        if not self.want_block(st, arg=False):
            return cls()
        values, _ = self.section(st, keys, (), path)
        return cls(**values)

    def cluster(self, st: Stanza | None) -> ClusterConfig | None:
        if st is None:
            self.error(
                SourceLoc(self.doc.source, 1, 1),
                "missing 'cluster' block",
                'add cluster { name = "..." gossip_address = "ip:port" }',
            )
            return None
        self.locs[("cluster",)] = st.loc
        self.want_block(st, arg=False)
        values, subs = self.section(st, _CLUSTER_TYPES, ("Topology",), ("cluster",))
        topology = [t for t in (self.topology(s, i) for i, s in enumerate(subs)) if t is not None]
        ok = True
        for key in ("name", "gossip_address"):
            if key not in values and ("cluster", key) not in self.locs:
                self.error(st.loc, f"missing required key '{key}' in cluster")
            if key not in values:
                ok = False
        if not ok:
            return None
        profile = values.get("profile", "lan")
        overrides = {k: values.pop(k) for k in list(values) if k in _TIMER_TYPES}
        timers = attrs.evolve(PRESETS[profile], **overrides)
        if self.node_name is not None:
            values["node_name"] = self.node_name
        values.setdefault("node_name", socket.gethostname())
        return ClusterConfig(timers=timers, topology=tuple(topology), **values)

    def topology(self, st: Stanza, index: int) -> Topology | None:
        if not self.want_block(st, arg=True):
            return None
        path = ("topology", index)
        self.locs[path] = st.loc
        network = self.arg_value(st, IPNetwork, "Topology")
        values, _ = self.section(st, _TOPOLOGY_TYPES, (), path)
        if "interface" not in values:
            if (*path, "interface") not in self.locs:
                self.error(st.loc, "missing required key 'interface' in Topology")
            return None
        if network is MISSING:
            return None
        if network.version == 6:
            values.setdefault("cidrmask", 128)
        return Topology(network=network, loc=st.loc, **values)

    def control(self, st: Stanza | None) -> ControlConfig:
        if st is None:
            return ControlConfig()
        self.want_block(st, arg=False)
        _, subs = self.section(st, {}, ("Listen",), ("control",))
        listen = self.single(subs, "Listen")
        if listen is None:
            self.error(st.loc, 'Control_Listener needs a Listen "/path/to/socket"')
            return ControlConfig()
        if not self.want_block(listen, arg=True):
            return ControlConfig()
        self.locs[("control", "listen")] = listen.loc
        path = self.arg_value(listen, Path, "Listen")
        values, _ = self.section(listen, _CONTROL_LISTEN_TYPES, (), ("control", "listen"))
        if path is MISSING:
            return ControlConfig()
        return ControlConfig(path=path, **values)

    def one_listen(self, st: Stanza | None) -> HostPort | None:
        """``ECCluster_Listener`` / ``Metrics``: exactly one ``Listen "ip:port"``, no options."""
        if st is None:
            return None
        self.want_block(st, arg=False)
        _, subs = self.section(st, {}, ("Listen",), (st.name.lower(),))
        listen = self.single(subs, "Listen")
        if listen is None:
            self.error(st.loc, f'{st.name} needs a Listen "ip:port"')
            return None
        if not self.want_block(listen, arg=True):
            return None
        self.locs[(st.name.lower(), "listen")] = listen.loc
        self.section(listen, {}, (), (st.name.lower(), "listen"))
        hp = self.arg_value(listen, HostPort, "Listen")
        return None if hp is MISSING else typing.cast(HostPort, hp)

    def listeners(self, stanzas: list[Stanza]) -> list[Listener]:
        out: list[Listener] = []
        for st in stanzas:
            self.want_block(st, arg=False)
            _, subs = self.section(st, {}, ("Listen",), ("esmtp",))
            for listen in subs:
                if not self.want_block(listen, arg=True):
                    continue
                path = ("listener", len(out))
                values, _ = self.section(listen, _LISTENER_TYPES, (), path)
                hp = self.arg_value(listen, HostPort, "Listen")
                if hp is MISSING:
                    continue
                self.locs[path] = listen.loc
                out.append(Listener(address=hp, loc=listen.loc, **values))
        return out

    def binding(self, st: Stanza, group: str | None, index: int) -> Binding | None:
        if not self.want_block(st, arg=True):
            return None
        assert st.arg is not None
        if not st.arg.text:
            self.error(st.arg.loc, "binding name must not be empty")
            return None
        path = ("binding", index)
        self.locs[path] = st.loc
        values, _ = self.section(st, _BINDING_TYPES, (), path)
        return Binding(name=st.arg.text, group=group, loc=st.loc, **values)

    def group(self, st: Stanza, bindings: list[Binding]) -> BindingGroup | None:
        if not self.want_block(st, arg=True):
            return None
        assert st.arg is not None
        _, subs = self.section(st, {}, ("Binding",), ("group",))
        names: list[str] = []
        for sub in subs:
            b = self.binding(sub, st.arg.text, len(bindings))
            if b is not None:
                bindings.append(b)
                names.append(b.name)
        return BindingGroup(name=st.arg.text, bindings=tuple(names), loc=st.loc)

    def health(self, st: Stanza, index: int) -> HealthCheck | None:
        """``Health_Check "NAME" { type = ... }``; ``type`` defaults to NAME when it is a kind."""
        if not self.want_block(st, arg=True):
            return None
        assert st.arg is not None
        path = ("health", index)
        self.locs[path] = st.loc
        values, _ = self.section(st, _HEALTH_TYPES, (), path)
        kind = values.pop("type", None)
        if kind is None and (*path, "type") in self.locs:
            return None  # a bad type, already reported
        if kind is None:
            kind = st.arg.text.lower()
            if kind not in ("smtp", "spool", "link", "script"):
                self.error(st.loc, f"Health_Check '{st.arg.text}' needs a type", "type = smtp | spool | link | script")
                return None
        return HealthCheck(name=st.arg.text, kind=kind, loc=st.loc, **values)


def structure(
    doc: Document, node_name: str | None = None
) -> tuple[Config | None, Locs, list[Diagnostic]]:
    """Structure a parsed document; the Config is None when any error was found."""
    return _Structurer(doc, node_name).run()
