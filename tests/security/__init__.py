"""The trust boundary (docs/security.md, issue 33): a hostile local user, real users, real daemons."""
