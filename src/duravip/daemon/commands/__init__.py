"""Console commands of a running node: what ``duravip console`` can ask and steer.

One module per command group, each with its own small context object (never
the node): :mod:`.cluster` (membership, info), :mod:`.duravip` (show, tables,
explain, announce, move), :mod:`.ops` (mailq, config reload) and
:mod:`.lifecycle` (metrics, shutdown). Each handler returns a
:class:`~duravip.control.protocol.Reply` with a human table (``text``) and the
same facts as JSON (``data``), so ``--json`` never needs a second code path.

The lifecycle group answers from the moment the control socket is up; the
other groups need running services, so until the node has started their
names answer with :data:`.common.NOT_STARTED` (see :class:`.common.Pending`).
This package's ``__init__`` imports nothing: the node imports the groups.
"""
