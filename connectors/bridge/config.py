"""Bridge connector configuration: where it listens, which terminals may connect, and the
CURVE keys that encrypt the link and say who a terminal is."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import msgspec
import zmq

from engine.core.errors import TradecopyError
from schemas.common import AccountId

#: A CURVE key as ZeroMQ's Z85 text: 40 characters for 32 bytes (``tradecopy bridge keys``).
Z85_PATTERN = r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}(?!\n)$"
Z85Key = Annotated[str, msgspec.Meta(pattern=Z85_PATTERN)]
#: Where the connector's CURVE secret key comes from unless ``secret_key_env`` names another.
DEFAULT_SECRET_KEY_ENV = "TRADECOPY_BRIDGE_SECRET_KEY"
#: The largest frame read from any peer (ZMQ_MAXMSGSIZE; a larger one drops the connection).
#: The largest legitimate frame is a snapshot: with every field at its schema maximum a symbol
#: is ~0.26 KB (the EA lists at most 500: 0.13 MB) and a position or pending order ~0.57 KB, so
#: 8 MiB holds ~14,500 positions and orders (a typical position is ~0.17 KB: ~48,000).
DEFAULT_MAX_FRAME_BYTES = 8 * 1024 * 1024
#: Field names that would put a secret key into the config file: refused by name.
SECRET_FIELDS = ("secret_key", "curve_secret_key")


class BridgeKeyError(TradecopyError):
    """The connector's CURVE keys are missing or do not fit its config."""


class BridgeTerminalConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    account: AccountId
    """Our account id; the EA's ZeroMQ identity and ``hello.account``."""
    token: Annotated[str, msgspec.Meta(min_length=16, max_length=256)]
    """Per-account secret the EA presents in ``hello`` (from the secret store, never a file
    in the repository)."""
    role: Annotated[str, msgspec.Meta(pattern=r"^(master|follower)$")]
    curve_public_key: Z85Key | None = None
    """The terminal's CURVE public key (the EA's ``InpPublicKey``): only a terminal holding
    its secret gets through the handshake, and it may speak only for this account."""


class BridgeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    connector_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}(?!\n)$")]
    endpoint: str = "tcp://127.0.0.1:5555"
    terminals: list[BridgeTerminalConfig] = []
    command_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """A command with no result by then is reported *unknown* (never rejected)."""
    heartbeat_ms: Annotated[int, msgspec.Meta(ge=100)] = 1000
    terminal_silence_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """No frame for this long: the terminal counts as disconnected."""
    plaintext: bool = False
    """No CURVE: frames and tokens cross the link in clear and any peer may knock. An explicit
    opt-out for a trusted loopback, logged as a warning at start."""
    public_key: Z85Key | None = None
    """The connector's CURVE public key (every EA's ``InpServerKey``); optional, and checked
    against the secret key at start when given."""
    secret_key_env: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(?!\n)$")] = (
        DEFAULT_SECRET_KEY_ENV
    )
    """The environment variable holding the connector's CURVE secret key (Z85)."""
    secret_key_file: str | None = None
    """Instead of the variable: a file holding the secret key, mode 0600, outside git."""
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=64 * 1024)] = DEFAULT_MAX_FRAME_BYTES
    """ZMQ_MAXMSGSIZE of the ROUTER: a peer sending a larger frame is disconnected unread."""


def server_secret_key(config: BridgeConfig, environ: Mapping[str, str] | None = None) -> str:
    """The connector's CURVE secret key (Z85), from ``secret_key_file`` or the environment.

    Raises :class:`BridgeKeyError` naming the variable (or file) when it is missing or not a
    key, and when the config cannot run with it (see :func:`check_curve_config`)."""
    env = os.environ if environ is None else environ
    if config.secret_key_file is not None:
        secret = _read_key_file(Path(config.secret_key_file).expanduser())
        where = f"secret_key_file {config.secret_key_file}"
    else:
        secret = env.get(config.secret_key_env, "").strip()
        where = f"${config.secret_key_env}"
        if not secret:
            raise BridgeKeyError(
                f"bridge {config.connector_id}: CURVE is on (the default) and {where} is not "
                "set: put the connector's secret key there (`tradecopy bridge keys` makes a "
                "pair), or name a 0600 file in secret_key_file; plaintext = true turns "
                "encryption off (a trusted loopback only)"
            )
    check_curve_config(config, secret, where)
    return secret


def public_key_of(secret: str) -> str:
    """The CURVE public key (Z85) of a secret key; ValueError for anything that is not one."""
    if len(secret) != 40:
        raise ValueError("a CURVE key is 40 characters of Z85")
    try:
        return zmq.curve_public(secret.encode("ascii")).decode("ascii")
    except (zmq.ZMQError, UnicodeError) as exc:
        raise ValueError(f"not a Z85 CURVE key: {exc}") from exc


def check_curve_config(config: BridgeConfig, secret: str, where: str = "the secret key") -> None:
    """Every terminal needs a key of its own, and the secret must be the configured pair's."""
    name = f"bridge {config.connector_id}"
    try:
        public = public_key_of(secret)
    except ValueError as exc:
        raise BridgeKeyError(f"{name}: {where} is not a CURVE secret key ({exc})") from None
    if config.public_key is not None and config.public_key != public:
        raise BridgeKeyError(
            f"{name}: {where} does not belong to public_key {config.public_key} (its public "
            f"key is {public})"
        )
    keyless = [t.account for t in config.terminals if t.curve_public_key is None]
    if keyless:
        raise BridgeKeyError(
            f"{name}: terminal(s) {', '.join(keyless)} have no curve_public_key; each needs "
            "the public key of its EA's pair (`tradecopy bridge keys`)"
        )
    owners: dict[str, str] = {}
    for terminal in config.terminals:
        assert terminal.curve_public_key is not None
        other = owners.setdefault(terminal.curve_public_key, terminal.account)
        if other != terminal.account:
            # One key, one account: the key is what says which account a terminal may be.
            raise BridgeKeyError(
                f"{name}: terminals {other} and {terminal.account} share a curve_public_key"
            )
    if public in owners:
        raise BridgeKeyError(f"{name}: terminal {owners[public]} uses the connector's own key")


def _read_key_file(path: Path) -> str:
    try:
        info = path.stat()
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise BridgeKeyError(
                f"{path}: a secret key file must be readable by its owner only (chmod 600)"
            )
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeError) as exc:
        raise BridgeKeyError(f"{path}: cannot read the bridge secret key: {exc}") from exc
