"""Checkpoint files on the local disk: the guard every write and deletion goes through
(``safepath``, ``target``), durable writes (``persist``), reading them back (``verify``,
``scan``), sharded units' manifests (``manifest``), deletion (``remove``), checks at
construction (``preflight``). Nothing here knows about remote stores, other tools' formats
or the save pipeline that strings these together (``ckptd.save``)."""
