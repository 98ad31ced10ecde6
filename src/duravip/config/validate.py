"""Semantic checks of a structured :class:`Config` (SPEC section 2).

Each rule is a small function yielding :class:`Diagnostic` objects, so one run
reports every problem and each rule can be tested on its own.
"""

from __future__ import annotations

import difflib
import grp
import os
import ssl
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from duravip.config.diagnostics import Diagnostic
from duravip.config.model import MAX_DURAVIPS, Binding, Config, Listener, SourceLoc
from duravip.config.structure import Locs
from duravip.ipaddr import IPAddress

Rule = Callable[[Config, Locs], Iterator[Diagnostic]]


def _err(loc: SourceLoc | None, msg: str, hint: str | None = None) -> Diagnostic:
    return Diagnostic("error", loc, msg, hint)


def _warn(loc: SourceLoc | None, msg: str, hint: str | None = None) -> Diagnostic:
    return Diagnostic("warning", loc, msg, hint)


#: One-entry cache for :func:`_declared_at`; it holds the config, so its id stays valid.
_DECLARED: list[tuple[Config, dict[IPAddress, SourceLoc | None]]] = []


def _declared_at(config: Config) -> dict[IPAddress, SourceLoc | None]:
    """For each DuraVIP, the first service (in file order) that makes it one."""
    if _DECLARED and _DECLARED[0][0] is config:
        return _DECLARED[0][1]
    out = _compute_declared(config)
    _DECLARED[:] = [(config, out)]
    return out


def _compute_declared(config: Config) -> dict[IPAddress, SourceLoc | None]:
    decl: list[tuple[tuple[int, int], IPAddress, SourceLoc | None]] = []
    for lst in config.listeners:
        if lst.is_duravip:
            decl.append((_order(lst.loc), lst.address.host, lst.loc))
    for b in config.bindings:
        if b.enable_duravip and b.bind_address is not None:
            decl.append((_order(b.loc), b.bind_address, b.loc))
    decl.sort(key=lambda d: d[0])
    out: dict[IPAddress, SourceLoc | None] = {}
    for _, ip, loc in decl:
        out.setdefault(ip, loc)
    return out


def _order(loc: SourceLoc | None) -> tuple[int, int]:
    return (loc.line, loc.col) if loc is not None else (0, 0)


def check_identity(config: Config, locs: Locs) -> Iterator[Diagnostic]:
    c = config.cluster
    if not c.name:
        yield _err(locs.get(("cluster", "name")), "cluster name must not be empty")
    if not c.node_name:
        yield _err(locs.get(("cluster", "node_name")), "node_name must not be empty")


def check_held_addresses(config: Config, locs: Locs) -> Iterator[Diagnostic]:
    """A DuraVIP must never be an address the node holds outside DuraVIP control."""
    held: dict[IPAddress, str] = {}
    for lst in config.listeners:
        if not lst.is_duravip:
            held.setdefault(lst.address.host, f"the address of plain listener {lst.address}")
    if config.metrics.listen is not None:
        held[config.metrics.listen.host] = "the metrics listen address"
    if config.cluster_listener is not None:
        held[config.cluster_listener.host] = "the ECCluster_Listener address"
    held[config.cluster.gossip_address.host] = "the node's gossip (main) address"
    decl = _declared_at(config)
    for ip in config.duravips:
        what = held.get(ip)
        if what is not None:
            yield _err(
                decl.get(ip),
                f"DuraVIP {ip} is {what}; the cluster would unplumb it",
                "use a dedicated address for each DuraVIP",
            )


def check_topology(config: Config, locs: Locs) -> Iterator[Diagnostic]:
    seen: dict[object, int] = {}
    for i, t in enumerate(config.cluster.topology):
        if t.network in seen:
            yield _err(t.loc, f"Topology {t.network} given twice")
        seen.setdefault(t.network, i)
        mask_loc = locs.get(("topology", i, "cidrmask"), t.loc)
        full = t.network.max_prefixlen
        if not 0 <= t.cidrmask <= full:
            yield _err(mask_loc, f"cidrmask must be 0..{full}, got {t.cidrmask}")
        elif t.cidrmask != full:
            yield _warn(
                mask_loc,
                f"cidrmask {t.cidrmask} in Topology {t.network}: DuraVIPs should be /{full}",
                "a shorter mask adds a subnet route that moves with the address",
            )
        if not t.interface:
            yield _err(locs.get(("topology", i, "interface"), t.loc), "interface must not be empty")
    decl = _declared_at(config)
    for ip in config.duravips:
        if config.topology_for(ip) is None:
            yield _err(
                decl.get(ip),
                f"no Topology block covers DuraVIP {ip}",
                f'add Topology "<network containing {ip}>" {{ interface = "..." }} in cluster',
            )


def check_count(config: Config, locs: Locs) -> Iterator[Diagnostic]:
    n = len(config.duravips)
    if n > MAX_DURAVIPS:
        ordered = sorted(_declared_at(config).values(), key=_order)
        loc = ordered[MAX_DURAVIPS] if len(ordered) > MAX_DURAVIPS else None
        yield _err(loc, f"{n} DuraVIPs configured; at most {MAX_DURAVIPS} are supported")


def check_listeners(config: Config, locs: Locs) -> Iterator[Diagnostic]:
    seen: dict[object, SourceLoc | None] = {}
    by_name: dict[str, Binding] = {}
    for b in config.bindings:
        by_name.setdefault(b.name.lower(), b)
    follow_at: dict[IPAddress, tuple[str, SourceLoc | None]] = {}
    independent = {ip for ip, d in config.duravips.items() if d.binding is not None}
    for i, lst in enumerate(config.listeners):
        if lst.address in seen:
            first = seen[lst.address]
            where = f" (first at line {first.line} col {first.col})" if first else ""
            yield _err(lst.loc, f"listener {lst.address} given twice{where}")
        seen.setdefault(lst.address, lst.loc)
        ip = lst.address.host
        follow = lst.duravip_follow
        follow_loc = locs.get(("listener", i, "duravip_follow"), lst.loc)
        pref_loc = locs.get(("listener", i, "duravip_preference"), lst.loc)
        if follow is not None:
            if lst.enable_duravip:
                yield _err(
                    follow_loc,
                    f"listener {lst.address} has both Enable_Duravip and Duravip_Follow",
                    "keep one: a follower is a DuraVIP already",
                )
            target = by_name.get(follow.lower())
            if target is None:
                names = [b.name for b in config.bindings]
                match = difflib.get_close_matches(follow, names, n=1, cutoff=0.6)
                yield _err(
                    follow_loc,
                    f"Duravip_Follow names no binding {follow!r} (by name or Bind_Address)",
                    f"did you mean '{match[0]}'?" if match else "only bindings can be followed",
                )
            elif not target.enable_duravip or target.bind_address is None:
                yield _err(
                    follow_loc,
                    f"Duravip_Follow: binding '{target.name}' is not a DuraVIP",
                    f"set Enable_Duravip = true and Bind_Address in Binding '{target.name}'",
                )
            elif target.bind_address == ip:
                yield _err(
                    follow_loc,
                    f"listener {lst.address} follows binding '{target.name}' on its own IP",
                    "give the listener and the binding different addresses",
                )
            else:
                prev = follow_at.get(ip)
                if prev is not None and prev[0].lower() != follow.lower():
                    yield _err(
                        follow_loc,
                        f"{ip} follows both '{prev[0]}' and '{follow}'",
                        "every listener on one IP must follow the same binding",
                    )
                elif ip in independent:
                    yield _err(
                        follow_loc,
                        f"{ip} follows binding '{follow}' but is also a binding's Bind_Address",
                        "a followed IP cannot be managed on its own",
                    )
                follow_at.setdefault(ip, (follow, follow_loc))
            if lst.duravip_preference is not None:
                yield _warn(
                    pref_loc,
                    f"Duravip_Preference on listener {lst.address} that follows is ignored",
                    "set the preference on the followed binding",
                )
        elif lst.duravip_preference is not None:
            if lst.enable_duravip:
                yield _warn(
                    pref_loc,
                    f"Duravip_Preference on Enable_Duravip listener {lst.address}",
                    "set preferences on bindings; the reference advises against this",
                )
            else:
                yield _warn(
                    pref_loc,
                    f"Duravip_Preference on plain listener {lst.address} has no effect",
                )
    for j, lst in enumerate(config.listeners):
        followed = follow_at.get(lst.address.host)
        enable_loc = locs.get(("listener", j, "enable_duravip"))
        if followed is not None and lst.duravip_follow is None and enable_loc is not None:
            yield _err(
                enable_loc,
                f"{lst.address.host} follows binding '{followed[0]}' but listener "
                f"{lst.address} manages it with Enable_Duravip",
                "make every listener on a followed IP a Duravip_Follow",
            )


def check_bindings(config: Config, locs: Locs) -> Iterator[Diagnostic]:
    names: dict[str, SourceLoc | None] = {}
    ips: dict[IPAddress, str] = {}
    for i, b in enumerate(config.bindings):
        low = b.name.lower()
        if low.startswith("#"):
            yield _err(
                b.loc,
                f"binding name '{b.name}' is reserved",
                "names starting with '#' are virtual bindings such as #mmove",
            )
        if low in names:
            first = names[low]
            where = f" (first at line {first.line} col {first.col})" if first else ""
            yield _err(b.loc, f"binding name '{b.name}' used twice{where}")
        names.setdefault(low, b.loc)
        addr_loc = locs.get(("binding", i, "bind_address"), b.loc)
        if b.bind_address is not None:
            other = ips.get(b.bind_address)
            if other is not None and other.lower() != low:
                yield _err(
                    addr_loc,
                    f"bindings '{other}' and '{b.name}' share Bind_Address {b.bind_address}",
                    "each binding needs its own address",
                )
            ips.setdefault(b.bind_address, b.name)
        elif b.enable_duravip:
            yield _err(
                locs.get(("binding", i, "enable_duravip"), b.loc),
                f"binding '{b.name}' has Enable_Duravip but no Bind_Address",
            )


def check_groups(config: Config, locs: Locs) -> Iterator[Diagnostic]:
    """Group names must be unique and distinct from binding names: mail names either."""
    bindings = {b.name.lower() for b in config.bindings}
    seen: set[str] = set()
    for g in config.groups:
        low = g.name.lower()
        if low in seen:
            yield _err(g.loc, f"Binding_Group '{g.name}' given twice")
        elif low in bindings:
            yield _err(
                g.loc,
                f"Binding_Group '{g.name}' has the name of a binding",
                "X-Binding names a binding or a group: keep the names distinct",
            )
        seen.add(low)


def check_timers(config: Config, locs: Locs) -> Iterator[Diagnostic]:
    t = config.cluster.timers
    if t.probe_timeout >= t.probe_interval:
        yield _err(
            locs.get(("cluster", "probe_timeout"), locs.get(("cluster",))),
            f"probe_timeout ({t.probe_timeout}s) must be shorter than "
            f"probe_interval ({t.probe_interval}s)",
        )
    if t.mtu < 576:
        yield _err(locs.get(("cluster", "mtu")), f"mtu {t.mtu} is below the IPv4 minimum 576")
    if config.cluster.keyring is None:
        yield _warn(
            locs.get(("cluster",)),
            "no keyring: cluster traffic cannot be authenticated or encrypted",
            'set keyring = "/etc/duravip/keyring"',
        )


def check_control(config: Config, locs: Locs) -> Iterator[Diagnostic]:
    """The control socket is a root shell on the cluster: keep its mode narrow."""
    c = config.control
    listen = locs.get(("control", "listen"))
    mode_loc = locs.get(("control", "listen", "mode"), listen)
    group_loc = locs.get(("control", "listen", "group"), listen)
    if c.mode & 0o007:
        yield _warn(
            mode_loc,
            f"control socket mode {c.mode:04o} gives every local user access",
            'use mode = "0600", or "0660" with group = "..."',
        )
    elif c.mode & 0o020 and c.group is None:
        yield _warn(
            mode_loc,
            f"control socket mode {c.mode:04o} lets a group write but no group is set",
            'set group = "..." in this Listen block, or use mode = "0600"',
        )
    if c.group is not None:
        if not c.mode & 0o020:
            yield _warn(
                group_loc,
                f"control socket group '{c.group}': mode {c.mode:04o} does not let it connect",
                'use mode = "0660"',
            )
        if not _group_exists(c.group):
            yield _warn(
                group_loc,
                f"control socket group '{c.group}' does not exist on this host",
                "the daemon refuses to start without it",
            )


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return name.isdigit()
    return True


def check_smtp_limits(config: Config, locs: Locs) -> Iterator[Diagnostic]:
    """Session caps of 0 would refuse every client: surely a typo."""
    s = config.smtp
    for key in ("max_sessions", "max_sessions_per_ip"):
        if getattr(s, key) < 1:
            yield _err(locs.get(("smtp", key), locs.get(("smtp",))), f"{key} must be at least 1")
    if s.max_sessions_per_ip > s.max_sessions:
        yield _warn(
            locs.get(("smtp", "max_sessions_per_ip"), locs.get(("smtp",))),
            f"max_sessions_per_ip ({s.max_sessions_per_ip}) is above max_sessions "
            f"({s.max_sessions}): only max_sessions applies",
        )


def check_delivery(config: Config, locs: Locs) -> Iterator[Diagnostic]:
    """The delivery dedup window: a negative age or a count under 1 is a typo."""
    d = config.delivery
    if d.dedup_window < 0:
        yield _err(locs.get(("delivery", "dedup_window"), locs.get(("delivery",))), "dedup_window must not be negative")
    if d.dedup_max < 1:
        yield _err(locs.get(("delivery", "dedup_max"), locs.get(("delivery",))), "dedup_max must be at least 1")


def check_tls(config: Config, locs: Locs) -> Iterator[Diagnostic]:
    """STARTTLS files of each Listen block: present, loadable, the key kept private."""
    if config.smtp.session_timeout <= 0:
        yield _err(
            locs.get(("smtp", "session_timeout"), locs.get(("smtp",))),
            "session_timeout must be positive",
        )
    loaded: dict[tuple[object, object], str | None] = {}
    for i, lst in enumerate(config.listeners):

        def at(key: str, i: int = i, lst: Listener = lst) -> SourceLoc | None:
            return locs.get(("listener", i, key), lst.loc)

        cert, key = lst.tls_certificate, lst.tls_key
        if key is not None and cert is None:
            yield _err(at("tls_key"), f"listener {lst.address} has tls_key but no tls_certificate")
        if lst.tls == "required" and cert is None:
            yield _err(
                at("tls"),
                f"listener {lst.address} has tls = required but no tls_certificate",
                'set tls_certificate = "/path/cert.pem" (and tls_key), or tls = optional',
            )
        if cert is None or lst.tls == "off":
            continue
        missing = False
        for name, path in (("tls_certificate", cert), ("tls_key", key)):
            if path is not None and not path.is_file():
                missing = True
                yield _err(at(name), f"{name} {path} is not a readable file on this host")
        if missing:
            continue
        secret = key if key is not None else cert
        try:
            mode = secret.stat().st_mode
        except OSError:
            mode = 0
        if mode & 0o004:
            yield _warn(
                at("tls_key" if key is not None else "tls_certificate"),
                f"TLS key {secret} is readable by every local user (mode {mode & 0o777:04o})",
                f"chmod 600 {secret}",
            )
        if (cert, key) not in loaded:
            loaded[(cert, key)] = _tls_load_error(cert, key)
        problem = loaded[(cert, key)]
        if problem is not None:
            yield _err(at("tls_certificate"), f"TLS certificate {cert} does not load: {problem}")


def _tls_load_error(cert: Path, key: Path | None) -> str | None:
    """Why ``cert``/``key`` cannot serve TLS (not PEM, key does not match), or None."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    except (OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__
    return None


def check_operator(config: Config, locs: Locs) -> Iterator[Diagnostic]:
    """Health checks, preemption and notify hooks (``docs/operations.md``)."""
    c = config.cluster
    names: set[str] = set()
    for i, h in enumerate(config.health):
        at = locs.get(("health", i), h.loc)

        def key(k: str, i: int = i, at: SourceLoc | None = at) -> SourceLoc | None:
            return locs.get(("health", i, k), at)

        if h.name.lower() in names:
            yield _err(at, f"Health_Check '{h.name}' given twice", "give each check its own name")
        names.add(h.name.lower())
        for k in ("rise", "fall", "flap_limit"):
            if getattr(h, k) < 1:
                yield _err(key(k), f"{k} must be at least 1")
        for k in ("interval", "timeout", "hold_down"):
            if getattr(h, k) <= 0:
                yield _err(key(k), f"{k} must be positive")
        if h.timeout > h.interval and h.kind != "link":  # link has no probe to time out
            yield _warn(key("timeout"), f"timeout ({h.timeout}s) is longer than interval ({h.interval}s)")
        if h.min_free < 0:
            yield _err(key("min_free"), "min_free must not be negative")
        if h.kind == "script":
            if h.path is None:
                yield _err(at, f"script check '{h.name}' needs a path", 'path = "/usr/local/bin/check"')
            elif not os.access(h.path, os.X_OK):
                yield _warn(key("path"), f"{h.path} is not an executable file on this host")
        elif h.path is not None:
            yield _warn(key("path"), f"path is only used by script checks, not {h.kind}")
        if h.kind == "link" and not c.topology:
            yield _warn(at, "link check without any Topology interface watches nothing")
    if c.preempt_delay < 0:
        yield _err(locs.get(("cluster", "preempt_delay")), "preempt_delay must not be negative")
    for i, b in enumerate(config.bindings):
        if b.preempt_delay is not None and b.preempt_delay < 0:
            yield _err(locs.get(("binding", i, "preempt_delay"), b.loc), "preempt_delay must not be negative")
    if c.notify_timeout <= 0:
        yield _err(locs.get(("cluster", "notify_timeout")), "notify_timeout must be positive")
    if c.notify is not None and not os.access(c.notify, os.X_OK):
        yield _warn(locs.get(("cluster", "notify")), f"notify program {c.notify} is not executable on this host")
    if c.notify_fifo is not None and c.notify_fifo.exists() and not stat.S_ISFIFO(c.notify_fifo.stat().st_mode):
        yield _warn(locs.get(("cluster", "notify_fifo")), f"notify_fifo {c.notify_fifo} is not a FIFO")


RULES: tuple[Rule, ...] = (
    check_identity,
    check_held_addresses,
    check_topology,
    check_count,
    check_listeners,
    check_bindings,
    check_groups,
    check_timers,
    check_control,
    check_smtp_limits,
    check_delivery,
    check_tls,
    check_operator,
)


def validate(config: Config, locs: Locs | None = None) -> list[Diagnostic]:
    """Run every rule; the result is sorted by position, errors and warnings mixed."""
    locs = locs or {}
    out = [d for rule in RULES for d in rule(config, locs)]
    out.sort(key=lambda d: (d.loc.file, d.loc.line, d.loc.col) if d.loc else ("", 0, 0))
    return out
