"""The election rule: from (views, alive members) to one decision per DuraVIP.

Pure and deterministic: every node that sees the same views and the same
alive set computes the same owners, with no extra messages. The owner is, in
priority order: an admin move override whose target is a candidate; the
owner of the followed binding (``Duravip_Follow``); the preferred node when it
is a candidate and preferences do not conflict; else the candidate with the
highest rendezvous score ``xxh3_64(ip, seed=xxh3_64(node))`` (ties: the
smallest node name). BROKEN IPs have no owner.

:class:`Resolver` keeps per-IP hash winners between calls so one membership
change re-scores only the IPs that must change; :func:`resolve` is a fresh
resolver (a full computation).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from ipaddress import ip_address
from itertools import repeat

import attrs
import xxhash
from attrs import frozen

from duravip.election.claims import BROKEN, CONFLICT, NO_STATES, Info, combine, derived
from duravip.election.view import NodeView, Override, VipClaim
from duravip.ipaddr import IPAddress

__all__ = ["Decision", "Resolver", "node_seed", "resolve", "score"]

_h = xxhash.xxh3_64_intdigest


@frozen
class Decision:
    """The election result for one IP."""

    owner: str | None
    states: frozenset[str]
    #: Alive, mature nodes announcing the IP, sorted by name.
    candidates: tuple[str, ...]
    #: Why this owner, for the console (``cluster duravip explain``).
    reason: str
    #: The (non-conflicting) preferred node, whether or not it is a candidate.
    preferred: str | None = None
    #: For a ``Duravip_Follow`` listener IP: the followed binding's IP.
    follows: IPAddress | None = None
    #: The admin-move target, when an override is in force for this IP.
    override: str | None = None
    #: The candidate the rule would pick but that leaves the IP with its live
    #: holder for now (``preempt``; see :mod:`duravip.election.preempt`).
    failback: str | None = None
    #: Wall-clock time that fail-back is due (None: not before an operator
    #: ``move`` or the holder leaving).
    failback_at: float | None = None


def node_seed(node: str) -> int:
    """The per-node xxh3 seed (stable across processes and Python versions)."""
    return _h(node.encode())


def score(ip: IPAddress, node: str) -> int:
    """Rendezvous score of ``node`` for ``ip`` (for ``explain``)."""
    return _h(ip.packed, node_seed(node))


class Resolver:
    """Incremental election: same results as :func:`resolve`, less work.

    Cached per IP: the combined claims (valid while the set of distinct live
    ``vips`` mappings is unchanged), the candidate tuple and the hash winner.
    On a membership change only the IPs whose winner left are re-scored and,
    for a join, only the newcomer's score is compared with the winner's.
    """

    def __init__(self) -> None:
        self._groups_key: frozenset[int] = frozenset()
        self._groups: dict[int, Mapping[IPAddress, VipClaim]] = {}
        self._info: dict[int, Info] = {}
        self._sig: dict[int, tuple[int, ...]] = {}
        self._ips_by_sig: dict[tuple[int, ...], list[int]] = {}
        self._followers: dict[int, list[int]] = {}
        self._cands_by_sig: dict[tuple[int, ...], tuple[str, ...]] = {}
        self._ipobj: dict[int, IPAddress] = {}
        self._packed: dict[int, bytes] = {}
        self._win: dict[int, tuple[int, str]] = {}
        #: Candidates ``_win`` was computed over, per IP (shared tuples).
        self._ip_cands: dict[int, tuple[str, ...]] = {}
        self._overrides: dict[int, tuple[str, int, str]] = {}
        self._dec: dict[int, Decision] = {}
        self._out: dict[IPAddress, Decision] = {}
        #: IPs fully re-scored so far (for tests and the benchmark).
        self.rescored = 0

    @property
    def decisions(self) -> Mapping[IPAddress, Decision]:
        return self._out

    # ------------------------------------------------------------ layer A

    def _rebuild_claims(self, groups: dict[int, Mapping[IPAddress, VipClaim]]) -> None:
        info: dict[int, Info] = {}
        sigs: dict[int, tuple[int, ...]] = {}
        by_sig: dict[tuple[int, ...], list[int]] = {}
        ipobj: dict[int, IPAddress] = {}
        packed: dict[int, bytes] = {}
        cache: dict[tuple[int, ...], Info] = {}
        ders = [(gid, derived(groups[gid])) for gid in sorted(groups)]
        if len(ders) == 1:
            gid, d = ders[0]
            sig: tuple[int, ...] = (gid,)
            infos: list[Info] = []
            for c in d.claims:
                inf = cache.get((id(c),))
                if inf is None:
                    inf = cache[(id(c),)] = combine([c])
                infos.append(inf)
            info = dict(zip(d.ints, infos, strict=True))
            sigs = dict.fromkeys(d.ints, sig)
            by_sig = {sig: list(d.ints)} if d.ints else {}
            ipobj = dict(zip(d.ints, d.ipobjs, strict=True))
            packed = dict(zip(d.ints, d.packed, strict=True))
        else:
            claims: dict[int, list[VipClaim]] = {}
            sig_l: dict[int, list[int]] = {}
            for gid, d in ders:
                for n, c, o, p in zip(d.ints, d.claims, d.ipobjs, d.packed, strict=True):
                    lst = claims.get(n)
                    if lst is None:
                        claims[n] = [c]
                        sig_l[n] = [gid]
                        ipobj[n] = o
                        packed[n] = p
                    else:
                        if c not in lst:
                            lst.append(c)
                        sig_l[n].append(gid)
            interned: dict[tuple[int, ...], tuple[int, ...]] = {}
            for n in sorted(claims):
                lst = claims[n]
                ckey = tuple(map(id, lst))
                inf = cache.get(ckey)
                if inf is None:
                    inf = cache[ckey] = combine(lst)
                info[n] = inf
                s = tuple(sig_l[n])
                s = interned.setdefault(s, s)
                sigs[n] = s
                by_sig.setdefault(s, []).append(n)
        binding_ip: dict[str, int] = {}
        follow: list[int] = []
        for n, inf in info.items():
            if inf.binding is not None:
                binding_ip.setdefault(inf.binding.lower(), n)
            if inf.follow_name is not None:
                follow.append(n)
        followers: dict[int, list[int]] = {}
        for n in follow:
            inf = info[n]
            assert inf.follow_name is not None
            target = binding_ip.get(inf.follow_name.lower())
            if target is None:
                try:
                    target = int(ip_address(inf.follow_name))
                except ValueError:
                    target = None
            if target is None or target == n or target not in info:
                continue
            info[n] = attrs.evolve(inf, follows=target)
            followers.setdefault(target, []).append(n)
        self._info, self._sig, self._ips_by_sig = info, sigs, by_sig
        self._followers, self._ipobj, self._packed = followers, ipobj, packed

    # ------------------------------------------------------------ layer B

    def _score_all(self, ips: Iterable[int], cands: tuple[str, ...]) -> None:
        """Full rendezvous for ``ips`` over ``cands`` (sorted by name)."""
        win = self._win
        if not cands:
            for n in ips:
                win.pop(n, None)
            return
        seeds = [node_seed(c) for c in cands]
        packed = self._packed
        count = 0
        for n in ips:
            hs = list(map(_h, repeat(packed[n]), seeds))
            best = max(hs)
            win[n] = (best, cands[hs.index(best)])
            count += 1
        self.rescored += count

    def _score_delta(self, ips: list[int], old: tuple[str, ...], new: tuple[str, ...]) -> None:
        old_set = set(old)
        gone = old_set - set(new)
        added = [c for c in new if c not in old_set]
        win = self._win
        redo = [n for n in ips if n not in win or win[n][1] in gone]
        self._score_all(redo, new)
        if not added or not new:
            return
        redo_set = set(redo)
        keep = [n for n in ips if n not in redo_set]
        packed = self._packed
        for c in added:
            seed = node_seed(c)
            for n, s in zip(
                keep, map(_h, map(packed.__getitem__, keep), repeat(seed)), strict=True
            ):
                best, owner = win[n]
                if s > best or (s == best and c < owner):
                    win[n] = (s, c)

    # ------------------------------------------------------------ layer C

    def _decide(self, n: int, visiting: set[int]) -> Decision:
        inf = self._info[n]
        cands = self._cands_by_sig[self._sig[n]]
        ov = self._overrides.get(n)
        ov_target = ov[0] if ov is not None else None
        follows = self._ipobj[inf.follows] if inf.follows is not None else None
        if BROKEN in inf.states:
            return Decision(
                None,
                inf.states,
                cands,
                "BROKEN: nodes announce different bindings " + ", ".join(inf.bindings),
                None,
                follows,
                ov_target,
            )
        if not cands:
            return Decision(
                None,
                inf.states,
                cands,
                "no alive, mature node announces it",
                inf.preferred,
                follows,
                ov_target,
            )
        if ov is not None and ov[0] in cands:
            return Decision(
                ov[0],
                inf.states,
                cands,
                f"admin move to {ov[0]} (seq {ov[1]}, from {ov[2]})",
                inf.preferred,
                follows,
                ov[0],
            )
        notes: list[str] = []
        if ov is not None:
            notes.append(f"move target {ov[0]} is not a candidate")
        if inf.follows is not None:
            target = inf.follows
            if target in visiting:
                notes.append("follow cycle ignored")
            else:
                visiting.add(target)
                td = self._decide(target, visiting)
                visiting.discard(target)
                if td.owner is not None and td.owner in cands:
                    return Decision(
                        td.owner,
                        inf.states,
                        cands,
                        f"follows binding at {follows}, owned by {td.owner}",
                        inf.preferred,
                        follows,
                        None,
                    )
                notes.append(f"followed {follows} has owner {td.owner}, not a candidate here")
        if CONFLICT in inf.states:
            notes.append("CONFLICT: preferences " + ", ".join(inf.conflict) + " ignored")
        elif inf.preferred is not None:
            if inf.preferred in cands:
                return Decision(
                    inf.preferred,
                    inf.states,
                    cands,
                    "; ".join([f"preferred node {inf.preferred}", *notes]),
                    inf.preferred,
                    follows,
                    None,
                )
            notes.append(f"preferred {inf.preferred} is not a candidate")
        owner = self._win[n][1]
        reason = f"highest rendezvous score among {len(cands)} candidate(s)"
        if notes:
            reason += "; " + "; ".join(notes)
        return Decision(owner, inf.states, cands, reason, inf.preferred, follows, None)

    def _decide_many(self, ips: Iterable[int]) -> None:
        """Decide ``ips``; plain hash decisions are shared objects (cheap)."""
        shared: dict[tuple[str, int], Decision] = {}
        dec = self._dec
        info, sigs, cbs, win, ovs = (
            self._info,
            self._sig,
            self._cands_by_sig,
            self._win,
            self._overrides,
        )
        special: list[int] = []
        for n in ips:
            inf = info[n]
            if inf.states or inf.preferred is not None or inf.follows is not None or n in ovs:
                special.append(n)
                continue
            cands = cbs[sigs[n]]
            if not cands:
                special.append(n)
                continue
            owner = win[n][1]
            key = (owner, id(cands))
            d = shared.get(key)
            if d is None:
                d = shared[key] = Decision(
                    owner,
                    NO_STATES,
                    cands,
                    f"highest rendezvous score among {len(cands)} candidate(s)",
                )
            dec[n] = d
        for n in special:
            dec[n] = self._decide(n, {n})

    # ------------------------------------------------------------ update

    def update(
        self, views: Mapping[str, NodeView], alive: Collection[str]
    ) -> Mapping[IPAddress, Decision]:
        """Recompute for a new input; returns every decision.

        The returned mapping is this resolver's own: the next call updates it
        in place (copy it to keep a snapshot).
        """
        alive_set = set(alive)
        live = {n: v for n, v in views.items() if n in alive_set and v.node == n}
        groups = {id(v.vips): v.vips for v in live.values()}
        gkey = frozenset(groups)
        full = False
        if gkey != self._groups_key:
            self._groups_key, self._groups = gkey, groups
            self._rebuild_claims(groups)
            self._cands_by_sig = {}
            full = True
            info = self._info
            self._win = {n: w for n, w in self._win.items() if n in info}
            self._ip_cands = {n: c for n, c in self._ip_cands.items() if n in info}
        members: dict[int, list[str]] = {}
        for name in sorted(live):
            if live[name].mature:
                members.setdefault(id(live[name].vips), []).append(name)
        new_cbs: dict[tuple[int, ...], tuple[str, ...]] = {}
        dirty: list[int] = []
        for sig, ips in self._ips_by_sig.items():
            if len(sig) == 1:
                cands = tuple(members.get(sig[0], ()))
            else:
                cands = tuple(sorted({c for g in sig for c in members.get(g, ())}))
            old = self._cands_by_sig.get(sig)
            if old is not None and not full:
                if old == cands:
                    new_cbs[sig] = old  # keep the shared tuple object
                    continue
                self._score_delta(ips, old, cands)
            else:
                # After a claims rebuild: per-IP previous candidates still hold.
                by_old: dict[int, tuple[tuple[str, ...], list[int]]] = {}
                fresh: list[int] = []
                ipc = self._ip_cands
                for n in ips:
                    oc = ipc.get(n)
                    if oc is None:
                        fresh.append(n)
                    else:
                        by_old.setdefault(id(oc), (oc, []))[1].append(n)
                self._score_all(fresh, cands)
                for oc, sub in by_old.values():
                    if oc != cands:
                        self._score_delta(sub, oc, cands)
            self._ip_cands.update(dict.fromkeys(ips, cands))
            dirty.extend(ips)
            new_cbs[sig] = cands
        self._cands_by_sig = new_cbs
        overrides: dict[int, tuple[str, int, str]] = {}
        for name, v in live.items():
            for ip, ov in v.overrides.items():
                n = int(ip)
                cur = overrides.get(n)
                if cur is None or (ov.seq, name) > (cur[1], cur[2]):
                    overrides[n] = (ov.target, ov.seq, name)
        if overrides or self._overrides:
            dirty_set = set(dirty)
            for n in overrides.keys() | self._overrides.keys():
                if (
                    overrides.get(n) != self._overrides.get(n)
                    and n in self._info
                    and n not in dirty_set
                ):
                    dirty.append(n)
        self._overrides = overrides
        if full:
            self._dec = {}
        old_owner = {
            n: self._dec[n].owner for n in dirty if n in self._followers and n in self._dec
        }
        self._decide_many(dirty)
        # Followers of a binding whose owner changed follow it.
        queue = [
            n
            for n in dirty
            if n in self._followers and (n not in old_owner or old_owner[n] != self._dec[n].owner)
        ]
        changed = set(dirty)
        while queue:
            target = queue.pop()
            for f in self._followers.get(target, ()):
                before = self._dec.get(f)
                after = self._decide(f, {f})
                self._dec[f] = after
                changed.add(f)
                if after != before and f in self._followers:
                    queue.append(f)
        ipobj = self._ipobj
        if full:
            self._out = {ipobj[n]: self._dec[n] for n in sorted(self._dec)}
        else:
            out = self._out
            for n in changed:
                out[ipobj[n]] = self._dec[n]
        return self._out


def resolve(
    views: Mapping[str, NodeView], alive: Collection[str]
) -> Mapping[IPAddress, Decision]:
    """Decide every announced IP (see the module docstring for the rule)."""
    return dict(Resolver().update(views, alive))


def effective_overrides(
    views: Mapping[str, NodeView], alive: Collection[str]
) -> dict[IPAddress, Override]:
    """The winning override per IP among alive views (highest seq, then node)."""
    best: dict[IPAddress, tuple[int, str, Override]] = {}
    for n, v in views.items():
        if n not in alive:
            continue
        for ip, ov in v.overrides.items():
            cur = best.get(ip)
            if cur is None or (ov.seq, n) > (cur[0], cur[1]):
                best[ip] = (ov.seq, n, ov)
    return {ip: t[2] for ip, t in best.items()}
