"""Where a staged save goes: to the daemon over its socket (``link``), or to this process's persist
thread (``worker``) when no daemon answers; ``outlet`` is the one interface, ``record`` what became of each save.
"""
