"""Console commands of a running node: what ``duravip console`` can ask and steer.

One module per command group, each with its own small context object (never
the node): :mod:`.cluster` (membership, info), :mod:`.duravip` (show, tables,
explain; announce, move), :mod:`.mail` (mailq), :mod:`.reload` (config
reload) and :mod:`.lifecycle` (metrics, shutdown). Each handler returns a
:class:`~duravip.control.protocol.Reply` with a human table (``text``) and the
same facts as JSON (``data``), so ``--json`` never needs a second code path.

The node registers each group as soon as what it needs is running: metrics,
shutdown and the duravip views (which read only the node's state: nothing is
resolved before the resolver runs) with the control socket, mailq with the
mail service, the cluster group with membership, announce, move and reload
with the resolver. Until then a group's names answer
:data:`.common.NOT_STARTED` (see :class:`.common.Pending`).
This package's ``__init__`` imports nothing: the node imports the groups.
"""
