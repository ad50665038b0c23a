"""Broker credentials at rest: AES-256-GCM, bound to their tenant and account.

A ciphertext is ``version (1 byte) || nonce (12 bytes) || AES-GCM(ciphertext || tag)``; its
associated data is ``tenant_id NUL account_id``, so a ciphertext copied onto another account
or tenant row does not decrypt. The key id is stored beside it (column ``key_id``) so keys can
rotate: ``store.rotate_key`` re-encrypts every row of the old id under the new key.
"""

from __future__ import annotations

import os

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.api.config import MasterKey
from engine.core.errors import TradecopyError

_VERSION = b"\x01"
_NONCE = 12


class CredentialsError(TradecopyError):
    """A ciphertext does not decrypt with the key it names (wrong key, row or tampering)."""


class BrokerCredentials(msgspec.Struct, frozen=True, kw_only=True):
    """What a terminal needs to log in to the broker."""

    login: str
    password: str
    server: str


def associated_data(tenant_id: str, account_id: str) -> bytes:
    return f"{tenant_id}\x00{account_id}".encode()


def encrypt(key: MasterKey, plaintext: bytes, tenant_id: str, account_id: str) -> bytes:
    nonce = os.urandom(_NONCE)  # random 96-bit nonces: safe far beyond our row counts
    sealed = AESGCM(key.key).encrypt(nonce, plaintext, associated_data(tenant_id, account_id))
    return _VERSION + nonce + sealed


def decrypt(key: MasterKey, blob: bytes, tenant_id: str, account_id: str) -> bytes:
    if len(blob) < 1 + _NONCE + 16 or blob[:1] != _VERSION:
        raise CredentialsError(f"credentials of {account_id}: not a version-1 ciphertext")
    nonce, sealed = blob[1 : 1 + _NONCE], blob[1 + _NONCE :]
    try:
        return AESGCM(key.key).decrypt(nonce, sealed, associated_data(tenant_id, account_id))
    except InvalidTag:
        raise CredentialsError(
            f"credentials of {account_id} do not decrypt with key {key.key_id!r}"
        ) from None


def seal_credentials(
    key: MasterKey, credentials: BrokerCredentials, tenant_id: str, account_id: str
) -> bytes:
    return encrypt(key, msgspec.json.encode(credentials), tenant_id, account_id)


def open_credentials(
    key: MasterKey, blob: bytes, tenant_id: str, account_id: str
) -> BrokerCredentials:
    return msgspec.json.decode(decrypt(key, blob, tenant_id, account_id), type=BrokerCredentials)
