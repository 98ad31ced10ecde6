"""Raw stanza tree -> :class:`Config`: key lookup, typing, defaults, derived DuraVIPs.

Every problem is collected as a :class:`Diagnostic` instead of stopping at the
first, so ``check-config`` shows the operator everything in one run. Source
positions of keys the model classes do not carry are kept in a side table
(:data:`Locs`) for the validator.
"""

from __future__ import annotations

import difflib
import functools
import socket
import types
import typing
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Final, Literal, Union

import attrs

from duravip.config.convert import STRUCTURE, parse_mode
from duravip.config.diagnostics import Diagnostic
from duravip.config.model import (
    PRESETS,
    Binding,
    BindingGroup,
    ClusterConfig,
    Config,
    ControlConfig,
    DeliveryConfig,
    DuraVip,
    HostPort,
    Listener,
    MetricsConfig,
    SmtpLimits,
    SourceLoc,
    SpoolConfig,
    Timers,
    Topology,
)
from duravip.config.parser import Assign, Document, ListValue, Node, Scalar, Stanza

#: Source positions by path, e.g. ``("cluster", "gossip_address")`` or
#: ``("listener", 3, "duravip_follow")`` (index into ``Config.listeners``).
Locs = dict[tuple[object, ...], SourceLoc]

_MISSING: Final = object()

# Per-key converters that differ from the field's type default.
_SPECIAL: Final[dict[str, Callable[[str], Any]]] = {"mode": parse_mode}


def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type for an attrs class (model uses string annotations)."""
    attrs.resolve_types(cls)
    return {f.name: f.type for f in attrs.fields(cls) if f.name != "loc"}


_TIMER_TYPES: Final = _field_types(Timers)
_CLUSTER_TYPES: Final = {
    k: v for k, v in _field_types(ClusterConfig).items() if k not in ("timers", "topology")
} | _TIMER_TYPES
_TOPOLOGY_TYPES: Final = {"cidrmask": int, "interface": str}
_LISTENER_TYPES: Final = {k: v for k, v in _field_types(Listener).items() if k != "address"}
_BINDING_TYPES: Final = {
    k: v for k, v in _field_types(Binding).items() if k not in ("name", "group")
}
_SPOOL_TYPES: Final = _field_types(SpoolConfig)
_DELIVERY_TYPES: Final = _field_types(DeliveryConfig)
_SMTP_TYPES: Final = _field_types(SmtpLimits)
_CONTROL_LISTEN_TYPES: Final = {"mode": int, "group": str}
_TOP_TYPES: Final = {"use_iflist_cache": bool}

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
)
_DISPLAY: Final = {
    "enable_duravip": "Enable_Duravip",
    "duravip_follow": "Duravip_Follow",
    "duravip_preference": "Duravip_Preference",
    "bind_address": "Bind_Address",
}


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


@functools.cache
def _shape(tp: Any) -> tuple[str, Any, Any]:
    """How to convert a field type: ("tuple", item type, None), ("literal",
    choices, None) or ("scalar", type, cattrs hook). Cached: configs hold
    tens of thousands of values of a handful of types."""
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is tuple:
        return ("tuple", typing.get_args(tp)[0], None)
    if origin is Literal:
        return ("literal", typing.get_args(tp), None)
    return ("scalar", tp, STRUCTURE.get_structure_hook(tp))


def _suggest(word: str, candidates: Iterable[str]) -> str | None:
    cands = list(candidates)
    by_low = {c.lower(): c for c in cands}
    match = difflib.get_close_matches(word.lower(), list(by_low), n=1, cutoff=0.6)
    if match:
        return f"did you mean '{by_low[match[0]]}'?"
    if cands:
        return "expected one of: " + ", ".join(sorted(cands, key=str.lower))
    return None


class _Structurer:
    def __init__(self, doc: Document, node_name: str | None) -> None:
        self.doc = doc
        self.node_name = node_name
        self.diags: list[Diagnostic] = []
        self.locs: Locs = {}

    # -- diagnostics -------------------------------------------------------
    def error(self, loc: SourceLoc | None, message: str, hint: str | None = None) -> None:
        self.diags.append(Diagnostic("error", loc, message, hint))

    def info(self, loc: SourceLoc | None, message: str) -> None:
        self.diags.append(Diagnostic("info", loc, message))

    # -- generic helpers ---------------------------------------------------
    def convert(self, value: Scalar | ListValue, tp: Any, key: str) -> Any:
        """Convert one raw value to ``tp``; on failure record an error, return _MISSING."""
        kind, arg, hook = _shape(tp)
        if kind == "tuple":
            items = value.items if isinstance(value, ListValue) else (value,)
            out = [self.convert(item, arg, key) for item in items]
            return _MISSING if any(o is _MISSING for o in out) else tuple(out)
        if isinstance(value, ListValue):
            self.error(value.loc, f"'{key}' takes a single value, not a list")
            return _MISSING
        text = value.text
        try:
            if key in _SPECIAL:
                return _SPECIAL[key](text)
            if kind == "literal":
                low = text.lower()
                if low in arg:
                    return low
                self.error(
                    value.loc,
                    f"invalid value {text!r} for '{key}'",
                    _suggest(text, [str(c) for c in arg]),
                )
                return _MISSING
            return hook(text, arg)
        except ValueError as exc:
            self.error(value.loc, f"invalid value for '{key}': {exc}")
            return _MISSING

    def section(
        self,
        stanza: Stanza | None,
        keys: dict[str, Any],
        subs: Iterable[str] = (),
        path: tuple[object, ...] = (),
    ) -> tuple[dict[str, Any], list[Stanza]]:
        """Read a block: typed values of its keys, and its sub-stanzas (checked by name)."""
        values: dict[str, Any] = {}
        stanzas: list[Stanza] = []
        if stanza is None or stanza.body is None:
            return values, stanzas
        return self.items(stanza.body, keys, subs, path, stanza.name)

    def items(
        self,
        body: Iterable[Node],
        keys: dict[str, Any],
        subs: Iterable[str],
        path: tuple[object, ...],
        where: str,
    ) -> tuple[dict[str, Any], list[Stanza]]:
        sub_low = {s.lower(): s for s in subs}
        values: dict[str, Any] = {}
        seen: dict[str, SourceLoc] = {}
        stanzas: list[Stanza] = []
        for node in body:
            low = (node.key if isinstance(node, Assign) else node.name).lower()
            if isinstance(node, Assign):
                if low not in keys:
                    hint = _suggest(low, [_DISPLAY.get(k, k) for k in keys])
                    if low in sub_low:
                        hint = f"'{sub_low[low]}' is a block: write {sub_low[low]} ... {{ }}"
                    self.error(node.loc, f"unknown key '{node.key}' in {where}", hint)
                    continue
                if low in seen:
                    first = seen[low]
                    self.error(
                        node.loc,
                        f"duplicate key '{node.key}' in {where}",
                        f"first set at line {first.line} col {first.col}",
                    )
                    continue
                seen[low] = node.loc
                self.locs[(*path, low)] = node.loc
                v = self.convert(node.value, keys[low], _DISPLAY.get(low, low))
                if v is not _MISSING:
                    values[low] = v
            else:
                if low not in sub_low:
                    hint = _suggest(node.name, list(sub_low.values()))
                    if low in keys:
                        hint = f"'{node.name}' is a key: write {node.name} = value"
                    self.error(node.loc, f"unknown block '{node.name}' in {where}", hint)
                    continue
                stanzas.append(node)
        return values, stanzas

    def want_block(self, st: Stanza, arg: bool) -> bool:
        """Check the stanza's shape: an argument if ``arg``, never without a block unless allowed."""
        if arg and st.arg is None:
            self.error(st.loc, f"'{st.name}' needs an argument", f'write {st.name} "..." {{ }}')
            return False
        if not arg and st.arg is not None:
            self.error(st.arg.loc, f"'{st.name}' takes no argument", f"write {st.name} {{ }}")
            return False
        return True

    def single(self, stanzas: list[Stanza], name: str) -> Stanza | None:
        for extra in stanzas[1:]:
            first = stanzas[0].loc
            self.error(
                extra.loc,
                f"'{name}' given twice",
                f"first at line {first.line} col {first.col}; merge them",
            )
        return stanzas[0] if stanzas else None

    def arg_value(self, st: Stanza, tp: Any, what: str) -> Any:
        assert st.arg is not None
        return self.convert(st.arg, tp, what)

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
        if any(d.is_error for d in self.diags) or cluster is None:
            return None, self.locs, self.diags
        held = {cluster.gossip_address.host}
        held.update(hp.host for hp in (ecc, metrics) if hp is not None)
        listeners, bindings, duravips = self.derive(listeners, bindings, cluster, held)
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
        network = self.arg_value(st, IPv4Network, "Topology")
        values, _ = self.section(st, _TOPOLOGY_TYPES, (), path)
        if "interface" not in values:
            if (*path, "interface") not in self.locs:
                self.error(st.loc, "missing required key 'interface' in Topology")
            return None
        if network is _MISSING:
            return None
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
        if path is _MISSING:
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
        return None if hp is _MISSING else typing.cast(HostPort, hp)

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
                if hp is _MISSING:
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

    # -- derived -------------------------------------------------------------
    def derive(
        self,
        listeners: list[Listener],
        bindings: list[Binding],
        cluster: ClusterConfig,
        held: set[IPv4Address],
    ) -> tuple[list[Listener], list[Binding], dict[IPv4Address, DuraVip]]:
        """Work out every DuraVIP and upgrade the other services on its IP.

        Follow targets are resolved to binding names (by name or by IP);
        unresolvable ones are left as written for the validator to report.
        A plain service is upgraded only when its IP lies in a Topology block
        and is not one of the node's own addresses (``held``): otherwise the
        IP is the node's and the validator reports the clash instead.
        """
        nets = [t.network for t in cluster.topology]

        def upgradable(ip: IPv4Address) -> bool:
            return ip not in held and any(ip in n for n in nets)

        by_name: dict[str, Binding] = {}
        for b in bindings:
            by_name.setdefault(b.name.lower(), b)
        by_ip: dict[IPv4Address, Binding] = {}
        for b in bindings:
            if b.bind_address is not None:
                by_ip.setdefault(b.bind_address, b)

        resolved: list[Listener] = []
        for lst in listeners:
            follow = lst.duravip_follow
            if follow is not None:
                target = by_name.get(follow.lower())
                if target is None:
                    try:
                        target = by_ip.get(IPv4Address(follow))
                    except ValueError:
                        target = None
                if target is not None:
                    lst = attrs.evolve(lst, duravip_follow=target.name)
            resolved.append(lst)

        vip_ips: set[IPv4Address] = set()
        for lst in resolved:
            if lst.is_duravip:
                vip_ips.add(lst.address.host)
        for b in bindings:
            if b.enable_duravip and b.bind_address is not None:
                vip_ips.add(b.bind_address)

        out_listeners: list[Listener] = []
        ports: dict[IPv4Address, list[int]] = {}
        follows: dict[IPv4Address, str] = {}
        prefs: dict[IPv4Address, str] = {}
        for lst in resolved:
            ip = lst.address.host
            if ip in vip_ips and (lst.is_duravip or upgradable(ip)):
                ports.setdefault(ip, []).append(lst.address.port)
                if not lst.is_duravip:
                    self.info(
                        lst.loc,
                        f"listener {lst.address} upgraded to DuraVIP: {ip} is a DuraVIP "
                        "for another service",
                    )
                    lst = attrs.evolve(lst, enable_duravip=True)
                if lst.duravip_follow is not None:
                    follows.setdefault(ip, lst.duravip_follow)
                if lst.duravip_preference is not None:
                    prefs.setdefault(ip, lst.duravip_preference)
            out_listeners.append(lst)

        out_bindings: list[Binding] = []
        names: dict[IPv4Address, str] = {}
        for b in bindings:
            bip = b.bind_address
            if bip is not None and bip in vip_ips and (b.enable_duravip or upgradable(bip)):
                if not b.enable_duravip:
                    self.info(
                        b.loc,
                        f"binding '{b.name}' upgraded to DuraVIP: {bip} is a DuraVIP "
                        "for another service",
                    )
                    b = attrs.evolve(b, enable_duravip=True)
                names.setdefault(bip, b.name)
                if b.duravip_preference is not None:
                    prefs[bip] = b.duravip_preference  # a binding's preference wins
            out_bindings.append(b)

        duravips = {
            ip: DuraVip(
                ip=ip,
                listener_ports=tuple(sorted(ports.get(ip, ()))),
                binding=names.get(ip),
                preference=prefs.get(ip),
                follows=follows.get(ip),
            )
            for ip in sorted(vip_ips, key=int)
        }
        return out_listeners, out_bindings, duravips


def structure(
    doc: Document, node_name: str | None = None
) -> tuple[Config | None, Locs, list[Diagnostic]]:
    """Structure a parsed document; the Config is None when any error was found."""
    return _Structurer(doc, node_name).run()
