"""What each sealed identity value is bound to (the AES-GCM associated data beside its key):
a sealed value copied onto another row, user or tenant does not open."""

from __future__ import annotations

import uuid


def totp_binding(tenant_id: str | None, user_id: uuid.UUID) -> tuple[str, str]:
    """A TOTP secret (``api_totp.secret``): its tenant and user."""
    return tenant_id or "", f"totp:{user_id}"


def email_binding(tenant_id: str | None, email_id: uuid.UUID) -> tuple[str, str]:
    """An email of the outbox (``api_email_outbox.sealed``): its tenant and id."""
    return tenant_id or "", f"email:{email_id}"
