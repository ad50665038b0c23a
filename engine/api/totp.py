"""Time-based one-time passwords (RFC 6238 over RFC 4226): secrets, codes, the ±1 step window
that never accepts a step already used, provisioning URIs, and recovery codes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
import time
from urllib.parse import quote, urlencode

DIGITS = 6
STEP_S = 30
#: Steps either side of now a code may come from: clocks of phones drift.
WINDOW = 1
SECRET_BYTES = 20
"""160 bits, the length RFC 4226 recommends for HMAC-SHA-1."""
RECOVERY_CODES = 10
_RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i to misread


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def secret_base32(secret: bytes) -> str:
    """The form authenticator apps take (RFC 4648 base32, unpadded)."""
    return base64.b32encode(secret).decode().rstrip("=")


def hotp(secret: bytes, counter: int, *, digits: int = DIGITS, digest: str = "sha1") -> str:
    """RFC 4226 section 5.3: dynamic truncation of HMAC(secret, counter)."""
    mac = hmac.new(secret, struct.pack(">Q", counter), digest).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)


def step_of(unix_s: float, *, step_s: int = STEP_S) -> int:
    return int(unix_s // step_s)


def totp(
    secret: bytes,
    unix_s: float,
    *,
    digits: int = DIGITS,
    step_s: int = STEP_S,
    digest: str = "sha1",
) -> str:
    return hotp(secret, step_of(unix_s, step_s=step_s), digits=digits, digest=digest)


def matching_step(
    secret: bytes, code: str, *, last_step: int | None, now_s: float | None = None
) -> int | None:
    """The step ``code`` belongs to, within ±``WINDOW`` of now and after ``last_step`` (a step
    once used never counts again, so a code seen over a shoulder is worth nothing); None
    when it matches none. Every candidate is compared in constant time."""
    code = code.strip().replace(" ", "")
    if len(code) != DIGITS or not code.isascii() or not code.isdigit():
        return None
    now = step_of(time.time() if now_s is None else now_s)
    found = None
    for step in range(now - WINDOW, now + WINDOW + 1):
        expected = hotp(secret, step)
        if hmac.compare_digest(expected.encode(), code.encode()) and found is None:
            found = step
    if found is None or (last_step is not None and found <= last_step):
        return None
    return found


def provisioning_uri(secret: bytes, *, account: str, issuer: str) -> str:
    """``otpauth://totp/Issuer:account?secret=...`` (the Key Uri Format apps read as a QR)."""
    label = quote(f"{issuer}:{account}", safe="@:")
    params = {"secret": secret_base32(secret), "issuer": issuer, "algorithm": "SHA1",
              "digits": DIGITS, "period": STEP_S}  # fmt: skip
    query = urlencode(params)
    return f"otpauth://totp/{label}?{query}"


def new_recovery_codes(count: int = RECOVERY_CODES) -> list[str]:
    """Codes of 16 characters (~79 bits) in four groups: long enough that their SHA-256 kept
    in the database cannot be reversed by trying them all."""
    codes = []
    for _ in range(count):
        raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(16))
        codes.append("-".join(raw[i : i + 4] for i in range(0, 16, 4)))
    return codes


def normalise_recovery_code(code: str) -> str:
    """What the user typed, as the code was made (case, spaces and dashes forgiven)."""
    raw = "".join(ch for ch in code.lower() if ch.isalnum())
    return "-".join(raw[i : i + 4] for i in range(0, len(raw), 4))


def recovery_code_hash(code: str) -> bytes:
    return hashlib.sha256(normalise_recovery_code(code).encode()).digest()
