"""NATS users and what each may do: one nkey per role, permissions derived from the contract.

Every process talks to NATS as a user of one role, and a role may publish and subscribe only on
the subjects it owns (PRODUCT.md, invariant 4). The permission sets below are built from the
subject map and the stream list of ``schemas``, JetStream API subjects included, so a new
stream or bucket in the contract is covered without editing this file.

Authentication is by nkey: the server config holds only public keys; the seed is the secret and
reaches a process through its environment (``TRADECOPY_NATS_SEED``, or a file named by
``TRADECOPY_NATS_CREDS``), never a file under git. Each user also has a private inbox prefix
(``_INBOX_<user>``) so that no client can read another's JetStream replies or push deliveries.
"""

from __future__ import annotations

import enum
import json
import os
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.errors import TradecopyError
from engine.runtime.files import write_atomically
from schemas import subjects
from schemas.common import is_account_id
from schemas.streams import (
    FOLLOWER_ORDERS_STREAM,
    KV_BUCKETS,
    LEDGER_CONSUMERS,
    MASTER_EVENTS_STREAM,
    SIGNALS_STREAM,
    all_streams,
)

__all__ = [
    "CREDENTIAL_VARIABLES",
    "ENV_CREDS",
    "ENV_SEED",
    "ENV_TLS_CA",
    "ENV_TLS_CERT",
    "ENV_TLS_KEY",
    "ENV_USER",
    "NatsCredentials",
    "NatsCredentialsError",
    "NatsUser",
    "Permissions",
    "Role",
    "authorization_config",
    "connector_durable",
    "connector_permissions",
    "connector_user_name",
    "new_seed",
    "permissions_for",
    "public_key",
    "role_permission_variables",
    "subject_matches",
    "tls_context_from_env",
    "write_seed_file",
]

#: An nkey user seed (``SU…``): the secret that proves who a client is.
ENV_SEED = "TRADECOPY_NATS_SEED"
#: Path to a file holding the seed (``.nk``) or a NATS ``.creds`` file (JWT plus seed).
ENV_CREDS = "TRADECOPY_NATS_CREDS"
#: The user's name in the server config (``replicator``, ``connector-<id>``…): names its inbox.
ENV_USER = "TRADECOPY_NATS_USER"
#: TLS: the CA that signed the server's certificate; a client certificate and key for mTLS.
ENV_TLS_CA = "TRADECOPY_NATS_TLS_CA"
ENV_TLS_CERT = "TRADECOPY_NATS_TLS_CERT"
ENV_TLS_KEY = "TRADECOPY_NATS_TLS_KEY"
CREDENTIAL_VARIABLES = (ENV_SEED, ENV_CREDS, ENV_USER)

JS_API = "$JS.API"
#: Another service publishes refused master events here (one subject per master account).
MASTER_REJECTIONS = f"{subjects.PREFIX}.master.*.rejections"
#: Where the replicator's partition consumers push (``engine.replicator.service``).
REPLICATOR_DELIVER = f"{subjects.PREFIX}.deliver.replicator.>"
#: Buckets the operator (and the API) may write: the controls of copying.
OPERATOR_BUCKETS = (subjects.KV_LINKS, subjects.KV_CONTROL, subjects.KV_LINK_STATE, subjects.KV_FX)


class NatsCredentialsError(TradecopyError):
    """NATS credentials are missing, malformed, or refused by the server."""


class Role(enum.StrEnum):
    ADMIN = "admin"
    """Creates and updates the contract's streams and buckets (bootstrap, deploy jobs)."""
    REPLICATOR = "replicator"
    CONNECTOR = "connector"
    """One user per connector id, limited to its own accounts."""
    OPERATOR = "operator"
    """The CLI: links, emergency stops, resumes, reads."""
    QUOTES = "quotes"
    API = "api"
    """The HTTP facade: reads, the operator's writes (links, stops), and manual orders on
    follower accounts."""
    LEDGER = "ledger"
    """The ledger: its own durable consumers on the streams it stores, nothing else."""
    BILLING = "billing"
    """Billing's enforcement: reads and writes the links bucket (``enabled``), nothing else."""
    SIGNALS = "signals"
    """``tradecopy signals run``: strategy runs on quotes, their signals and failures, and the
    drive's manual orders on the deployments' paper masters."""


@dataclass(frozen=True, slots=True)
class Permissions:
    """Subjects a user may publish to and subscribe on; everything else is refused."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def may_publish(self, subject: str) -> bool:
        return any(subject_matches(pattern, subject) for pattern in self.publish)

    def may_subscribe(self, subject: str) -> bool:
        return any(subject_matches(pattern, subject) for pattern in self.subscribe)

    def to_config(self) -> dict[str, Any]:
        # An absent list would mean "everything": an empty one is written as deny-all.
        return {
            "publish": {"allow": list(self.publish)} if self.publish else {"deny": [">"]},
            "subscribe": {"allow": list(self.subscribe)} if self.subscribe else {"deny": [">"]},
        }


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` is one token, a trailing ``>`` one or more."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(have) == len(want)


# ------------------------------------------------------------------ the subject sets


def inbox_prefix(user: str) -> str:
    return f"_INBOX_{user}"


def connector_user_name(connector_id: str) -> str:
    return f"connector-{connector_id}"


def connector_durable(connector_id: str) -> str:
    """The connector's order consumer (``ConnectorRuntime.durable``; a test keeps them equal)."""
    return f"connector-{connector_id}"


def _stream_names() -> list[str]:
    """Every stream of the contract, KV buckets' streams included."""
    return [config.name or "" for config in all_streams()] + [f"KV_{b}" for b in KV_BUCKETS]


def _api(*tokens: str) -> str:
    return ".".join((JS_API, *tokens))


def _stream_info_all() -> list[str]:
    # ensure_streams / ensure_buckets look every stream up, whoever calls them.
    return [_api("STREAM", "INFO", name) for name in _stream_names()]


def _reader(stream: str) -> list[str]:
    """Read a stream: info, message gets (KV gets), ordered consumers with flow control."""
    return [
        _api("STREAM", "INFO", stream),
        _api("STREAM", "MSG", "GET", stream),
        _api("DIRECT", "GET", stream),
        _api("DIRECT", "GET", stream, ">"),
        _api("CONSUMER", "CREATE", stream),
        _api("CONSUMER", "CREATE", stream, ">"),
        _api("CONSUMER", "INFO", stream, "*"),
        _api("CONSUMER", "NAMES", stream),
        _api("CONSUMER", "LIST", stream),
        f"$JS.FC.{stream}.>",
    ]


def _durable_owner(stream: str, consumer: str) -> list[str]:
    """Create, inspect, re-create and acknowledge one durable consumer (``*``: any name)."""
    return [
        _api("CONSUMER", "DURABLE", "CREATE", stream, consumer),
        _api("CONSUMER", "CREATE", stream, consumer),
        _api("CONSUMER", "CREATE", stream, consumer, ">"),
        _api("CONSUMER", "INFO", stream, consumer),
        _api("CONSUMER", "DELETE", stream, consumer),
        f"$JS.ACK.{stream}.{consumer}.>",
    ]


def _kv(bucket: str, key: str = ">") -> str:
    return f"$KV.{bucket}.{key}"


def _reads_everything() -> list[str]:
    """Publish side of a read-only view of every stream and bucket."""
    out = [_api("INFO"), _api("STREAM", "NAMES"), _api("STREAM", "LIST")]
    for stream in _stream_names():
        out += _reader(stream)
    return out


_CONTRACT_SUBJECTS = (
    subjects.MASTER_EVENTS_IN,
    MASTER_REJECTIONS,
    subjects.FOLLOWER_ORDERS,
    subjects.CONNECTOR_ORDERS,
    subjects.EXECUTION_REPORTS,
    subjects.DECISIONS,
    subjects.QUOTES,
)


def admin_permissions() -> Permissions:
    publish = [_api("INFO"), _api("STREAM", "NAMES"), _api("STREAM", "LIST")]
    for stream in _stream_names():
        publish += [_api("STREAM", verb, stream) for verb in ("INFO", "CREATE", "UPDATE")]
    return Permissions(tuple(publish), (f"{inbox_prefix(Role.ADMIN)}.>",))


def replicator_permissions() -> Permissions:
    publish = [
        subjects.FOLLOWER_ORDERS,
        subjects.CONNECTOR_ORDERS,
        subjects.DECISIONS,
        MASTER_REJECTIONS,
        _kv(subjects.KV_LINK_STATE),
        *_stream_info_all(),
        *_durable_owner(MASTER_EVENTS_STREAM, "*"),
        # A new shard layout starts after the old layout's acknowledgement floor: it lists
        # the consumers of the master-event stream (read only).
        _api("CONSUMER", "LIST", MASTER_EVENTS_STREAM),
    ]
    # The live view watches and reads every bucket (link state with compare-and-set).
    for bucket in KV_BUCKETS:
        publish += _reader(f"KV_{bucket}")
    subscribe = (REPLICATOR_DELIVER, f"{inbox_prefix(Role.REPLICATOR)}.>")
    return Permissions(tuple(dict.fromkeys(publish)), subscribe)


def ledger_permissions() -> Permissions:
    """Its durable consumers on the streams it stores (create, inspect, pull, acknowledge) and
    its inbox: no publish on any contract subject, no other consumer."""
    publish: list[str] = []
    for stream, durable in LEDGER_CONSUMERS:
        publish += _durable_owner(stream, durable)
        publish.append(_api("CONSUMER", "MSG", "NEXT", stream, durable))
    return Permissions(tuple(dict.fromkeys(publish)), (f"{inbox_prefix(Role.LEDGER)}.>",))


def billing_permissions() -> Permissions:
    """Enforcement: read ``tc_links`` and write its keys (compare-and-set updates); no
    emergency stop, no order, no other bucket."""
    publish = [
        _kv(subjects.KV_LINKS),
        *_stream_info_all(),
        *_reader(f"KV_{subjects.KV_LINKS}"),
    ]
    return Permissions(tuple(dict.fromkeys(publish)), (f"{inbox_prefix(Role.BILLING)}.>",))


#: What the signal workers publish: ``tc.v1.signal.<version>.signals`` and ``.failures``.
STRATEGY_SIGNALS = subjects.strategy_signals("*")
STRATEGY_FAILURES = subjects.strategy_failures("*")


def signals_permissions() -> Permissions:
    """The strategy workers and their drive: quotes in; signals and failures out (stored);
    the claims bucket read and written; the deployments and symbols buckets read and
    watched; durable consumers on TC_SIGNALS (the drive's ``signals-drive-<hash>``); and
    the masters' manual orders on a follower orders subject, as the API sends them. No
    master event, no link, no stop, no other bucket.

    NATS matches whole tokens only, so the drive's consumers cannot be limited to the
    ``signals-drive-`` prefix: any durable on TC_SIGNALS is allowed, a stream this role
    writes itself and may read anyway.
    """
    publish = [
        STRATEGY_SIGNALS,
        STRATEGY_FAILURES,
        subjects.FOLLOWER_ORDERS,
        _kv(subjects.KV_SIGNAL_CLAIMS),
        *_stream_info_all(),
        *_reader(f"KV_{subjects.KV_SIGNAL_CLAIMS}"),
        *_reader(f"KV_{subjects.KV_SIGNAL_DEPLOYMENTS}"),
        *_reader(f"KV_{subjects.KV_SYMBOLS}"),
        *_durable_owner(SIGNALS_STREAM, "*"),
        _api("CONSUMER", "MSG", "NEXT", SIGNALS_STREAM, "*"),
    ]
    subscribe = (subjects.QUOTES, f"{inbox_prefix(Role.SIGNALS)}.>")
    return Permissions(tuple(dict.fromkeys(publish)), subscribe)


def connector_permissions(
    connector_id: str, masters: Iterable[str] = (), followers: Iterable[str] = ()
) -> Permissions:
    """Only its own accounts: their master events, reports, states and specs; only its orders."""
    masters, followers = sorted(set(masters)), sorted(set(followers))
    for account in (connector_id, *masters, *followers):
        if not is_account_id(account):
            raise NatsCredentialsError(
                f"{account!r} cannot name a NATS subject token (letters, digits, _ and -)"
            )
    publish = [subjects.master_events(m) for m in masters]
    # A master's reports too: it executes manual orders (a signal source drives it).
    publish += [subjects.execution_reports(a) for a in (*masters, *followers)]
    for account in sorted({*masters, *followers}):
        publish += [_kv(subjects.KV_ACCOUNTS, account), _kv(subjects.KV_SYMBOLS, f"{account}.>")]
    publish += _stream_info_all()
    publish += _durable_owner(FOLLOWER_ORDERS_STREAM, connector_durable(connector_id))
    subscribe = [f"{inbox_prefix(connector_user_name(connector_id))}.>", subjects.QUOTES]
    subscribe += [MASTER_REJECTIONS.replace("*", m) for m in masters]
    return Permissions(tuple(dict.fromkeys(publish)), tuple(subscribe))


def _controller(user: str) -> Permissions:
    """Operator and API: read everything; write links, stops, link states and FX rates."""
    publish = [_kv(bucket) for bucket in OPERATOR_BUCKETS] + _reads_everything()
    subscribe = [f"{inbox_prefix(user)}.>", *_CONTRACT_SUBJECTS]
    return Permissions(tuple(dict.fromkeys(publish)), tuple(subscribe))


def api_permissions() -> Permissions:
    """The controller's, plus manual orders: a follower's own orders subject (which its
    connector consumes); never a connector's batch subject, decisions or reports. And the
    strategy deployments bucket (put and delete: the deployment routes)."""
    controller = _controller(Role.API.value)
    publish = (*controller.publish, subjects.FOLLOWER_ORDERS, _kv(subjects.KV_SIGNAL_DEPLOYMENTS))
    return Permissions(tuple(dict.fromkeys(publish)), controller.subscribe)


def quotes_permissions() -> Permissions:
    return Permissions((subjects.QUOTES,), ())


def permissions_for(role: Role) -> Permissions:
    """The permissions of a role that has one user (connectors: ``connector_permissions``)."""
    match role:
        case Role.ADMIN:
            return admin_permissions()
        case Role.REPLICATOR:
            return replicator_permissions()
        case Role.OPERATOR:
            return _controller(role.value)
        case Role.API:
            return api_permissions()
        case Role.QUOTES:
            return quotes_permissions()
        case Role.LEDGER:
            return ledger_permissions()
        case Role.BILLING:
            return billing_permissions()
        case Role.SIGNALS:
            return signals_permissions()
    raise NatsCredentialsError(f"role {role.value!r} has one user per connector id")


#: Roles with one shared user each, in the order the configs list them.
SINGLE_USER_ROLES = (
    Role.ADMIN, Role.REPLICATOR, Role.OPERATOR, Role.API, Role.QUOTES, Role.LEDGER, Role.BILLING,
    Role.SIGNALS,
)  # fmt: skip


# ---------------------------------------------------------------------------- keys


def new_seed() -> str:
    """A fresh nkey user seed (``SU…``)."""
    import nkeys

    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)).decode()


def public_key(seed: str) -> str:
    """The public key (``U…``) of a user seed; a clear error for anything else."""
    import nkeys

    try:
        pair = nkeys.from_seed(bytearray(seed.strip().encode()))
        key = bytes(pair.public_key).decode()
    except (nkeys.NkeysError, ValueError, TypeError) as exc:
        raise NatsCredentialsError(f"not an nkey seed: {exc!r}") from None
    if not key.startswith("U"):
        raise NatsCredentialsError(f"an nkey seed of a user (SU…) is needed, not {seed[:2]}…")
    return key


@dataclass(frozen=True, slots=True)
class NatsCredentials:
    """What a client presents: its name (which names its inbox) and its seed or creds file."""

    user: str
    seed: str | None = None
    file: Path | None = None

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.user)

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``."""
        options: dict[str, Any] = {"inbox_prefix": self.inbox_prefix}
        if self.seed is not None:
            options["nkeys_seed_str"] = self.seed
        elif self.file is not None:
            text = _read_secret_file(self.file)
            if "BEGIN NATS USER JWT" in text:
                options["user_credentials"] = str(self.file)
            else:
                options["nkeys_seed"] = str(self.file)
        return options

    def env(self) -> dict[str, str]:
        """The environment a child process reads them from (a seed never goes to argv)."""
        out = {ENV_USER: self.user}
        if self.seed is not None:
            out[ENV_SEED] = self.seed
        elif self.file is not None:
            out[ENV_CREDS] = str(self.file)
        return out

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NatsCredentials | None:
        """The process's credentials, or None for an anonymous client (an open server)."""
        env = os.environ if environ is None else environ
        seed, creds, user = env.get(ENV_SEED), env.get(ENV_CREDS), env.get(ENV_USER)
        if not seed and not creds:
            if user:
                raise NatsCredentialsError(
                    f"${ENV_USER} is set but neither ${ENV_SEED} nor ${ENV_CREDS} is"
                )
            return None
        if seed and creds:
            raise NatsCredentialsError(f"set ${ENV_SEED} or ${ENV_CREDS}, not both")
        if not user:
            raise NatsCredentialsError(
                f"${ENV_USER} is not set: the user's name in the server config "
                f"(e.g. replicator, operator, connector-<id>) names its private inbox"
            )
        if not is_account_id(user):
            raise NatsCredentialsError(f"${ENV_USER}={user!r}: letters, digits, _ and - only")
        if seed:
            try:
                public_key(seed)
            except NatsCredentialsError as exc:
                raise NatsCredentialsError(f"${ENV_SEED}: {exc}") from None
            return cls(user=user, seed=seed.strip())
        path = Path(creds or "")
        _read_secret_file(path)
        return cls(user=user, file=path)


def write_seed_file(path: Path, seed: str) -> Path:
    """Write a seed where only its owner may read it (0600 from creation, directory 0700)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomically(path, (seed + "\n").encode())
    return path


def _read_secret_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise NatsCredentialsError(f"${ENV_CREDS}: cannot read {str(path)!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class NatsUser:
    """One server-side user: its role, name, permissions, and (where we made it) its seed."""

    role: Role
    name: str
    seed: str
    permissions: Permissions

    @property
    def public_key(self) -> str:
        return public_key(self.seed)

    @property
    def credentials(self) -> NatsCredentials:
        return NatsCredentials(user=self.name, seed=self.seed)

    @classmethod
    def generate(cls, role: Role) -> NatsUser:
        """A new user of a single-user role, with a fresh key."""
        return cls(role, role.value, new_seed(), permissions_for(role))

    @classmethod
    def connector(
        cls, connector_id: str, masters: Iterable[str] = (), followers: Iterable[str] = ()
    ) -> NatsUser:
        """A new user for one connector, limited to these accounts, with a fresh key."""
        return cls(
            Role.CONNECTOR,
            connector_user_name(connector_id),
            new_seed(),
            connector_permissions(connector_id, masters, followers),
        )


# -------------------------------------------------------------------- server config


def authorization_config(users: Sequence[NatsUser]) -> str:
    """The server's ``authorization`` block: public keys and permissions, nothing secret."""
    entries = []
    for user in users:
        entry = {"nkey": user.public_key, "permissions": user.permissions.to_config()}
        entries.append(f"    # {user.name}\n    {json.dumps(entry)}")
    return "authorization {\n  users = [\n" + "\n".join(entries) + "\n  ]\n}\n"


def permission_variable(role: Role) -> str:
    return f"TC_{role.value.upper()}_PERMISSIONS"


BLOCK_BEGIN = "# BEGIN tradecopy role permissions"
BLOCK_END = "# END tradecopy role permissions"


def role_permission_variables() -> str:
    """Every single-user role's permissions as config variables, for the deploy configs.

    ``tradecopy nats permissions`` prints this block (``--write FILE`` replaces it in place);
    the cluster configs under ``deploy/`` carry it verbatim between its BEGIN and END lines
    (a test keeps them in step) and give each role's user its variable.
    """
    lines = [
        BLOCK_BEGIN,
        "# Generated from the contract (engine/runtime/natsauth.py): never edit by hand;",
        "# regenerate with `tradecopy nats permissions --write FILE`.",
    ]
    for role in SINGLE_USER_ROLES:
        body = json.dumps(permissions_for(role).to_config(), indent=2)
        lines.append(f"{permission_variable(role)} = {body}")
    lines.append(BLOCK_END)
    return "\n".join(lines) + "\n"


def replace_role_permissions(text: str) -> str:
    """``text`` with its BEGIN…END role-permission block replaced by the current one."""
    start, end = text.find(BLOCK_BEGIN), text.find(BLOCK_END)
    if start < 0 or end < start:
        raise NatsCredentialsError(f"no '{BLOCK_BEGIN}' … '{BLOCK_END}' block to replace")
    after = text.find("\n", end)
    tail = "" if after < 0 else text[after + 1 :]
    return text[:start] + role_permission_variables() + tail


# ----------------------------------------------------------------------------- TLS


def tls_context_from_env(environ: Mapping[str, str] | None = None) -> ssl.SSLContext | None:
    """A client TLS context from ``TRADECOPY_NATS_TLS_*``, or None when none is set."""
    env = os.environ if environ is None else environ
    ca, cert, key = env.get(ENV_TLS_CA), env.get(ENV_TLS_CERT), env.get(ENV_TLS_KEY)
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise NatsCredentialsError(f"${ENV_TLS_CERT} and ${ENV_TLS_KEY} go together")
    try:
        return client_tls_context(ca, cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise NatsCredentialsError(f"NATS TLS files ({ENV_TLS_CA} etc.): {exc}") from None


def client_tls_context(
    ca: str | Path | None, cert: str | Path | None = None, key: str | Path | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert and key:
        context.load_cert_chain(str(cert), str(key))
    return context
