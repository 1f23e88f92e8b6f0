"""The remote tier (SPEC §11): stores (``stores``: S3 and shared filesystems), uploading a
verified checkpoint then its commit object (``upload``), what is committed there and a cached
index of it that never blocks a local save (``listing``), reading a copy back (``verify``),
downloading (``fetch``), remote retention (``prune``), and the background thread that does
all of it in order (``uploader``)."""
