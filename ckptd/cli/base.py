"""The ``ckptd`` command group and what its verbs share: settings as options, the daemon client."""

from __future__ import annotations

import os
from typing import Any, Callable

import click

from ckptd import __version__
from ckptd.core.settings import KEYS, SettingsError, default


def setting_options(*groups: str, exclude: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Every policy/retention key of the given groups as a ``--dashed`` option (SPEC §6)."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        for key, spec in reversed(list(KEYS.items())):
            if spec.group in groups and key not in exclude:
                f = _option(key, spec)(f)
        return f

    return decorate


def _option(key: str, spec: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--keep-final/--no-keep-final`` for a boolean key, a ``[min|max]`` choice for a choice."""
    name = "--" + key.replace("_", "-")
    if isinstance(default(key), bool):
        return click.option(f"{name}/--no-{name[2:]}", key, default=None, help=spec.help)
    choices = getattr(spec.parse, "choices", None)
    if choices:
        return click.option(name, key, type=click.Choice(choices), default=None, help=spec.help)
    return click.option(name, key, default=None, help=spec.help)


@click.group()
@click.version_option(__version__, prog_name="ckptd")
def main() -> None:
    """ckptd: checkpoints that are written, verified and kept, or an alert says why not."""


SOCKET_OPTION = click.option(
    "--socket",
    "socket_path",
    default=None,
    envvar="CKPTD_SOCKET",
    help="daemon socket (default: $CKPTD_SOCKET, $XDG_RUNTIME_DIR/ckptd.sock, /run/ckptd/ckptd.sock)",
)


def is_directory(target: str | None) -> bool:
    """A directory to read, or a job name to ask the daemon about. Something written like a path
    (a '/', a leading '.') that is not there is an error about the path, not about the daemon."""
    if target is None:
        return False
    if os.path.isdir(target):
        return True
    if "/" in target or target.startswith(".") or os.path.exists(target):
        raise click.ClickException(f"{target}: no such directory")
    return False


def configured_socket() -> str | None:
    """The socket the configuration file names (``$CKPTD_CONFIG`` or /etc/ckptd/ckptd.toml), when a
    daemon is listening there: the CLI then talks to the daemon that file configures, as systemd runs
    it, without ``--socket``. ``--socket`` and ``$CKPTD_SOCKET`` still come first."""
    import stat

    from ckptd.core import config as config_mod

    try:
        path = config_mod.load().daemon.socket
        return path if path and stat.S_ISSOCK(os.stat(path).st_mode) else None
    except (SettingsError, OSError):
        return None


def ask(socket_path: str | None, msg: dict[str, Any]) -> dict[str, Any]:
    """One request to the running daemon; a clear error when there is none."""
    from ckptd.wire.client import DaemonUnavailable, request
    from ckptd.wire.protocol import default_socket_path

    try:
        reply = request(socket_path or configured_socket() or default_socket_path(), msg)
    except DaemonUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("error", reply)))
    return reply
