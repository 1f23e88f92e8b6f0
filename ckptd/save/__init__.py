"""One save, whoever runs it (the daemon, the hook's embedded worker, every rank of a sharded
save): the stages in order (``pipeline``), what retention and quota keep (``keep``), the
ranks' agreement on a sharded unit (``agree``) and the one resume search (``newest``)."""
