"""Tenant ids: an HMAC of the key under a secret kept in Redis, created once and shared."""

from __future__ import annotations

import hashlib
import re

from service.record.store import Store
from service.record.tenants import legacy_tenant_of, tenant_of
from tests.service.record.test_store import _url, store

__all__ = ["store"]  # the fixture, shared with test_store


def test_a_tenant_id_needs_the_secret() -> None:
    key = "sk-weak"
    a, b = tenant_of(key, b"secret one"), tenant_of(key, b"secret two")
    assert re.fullmatch(r"[0-9a-f]{16}", a) and a != b, "the same key under another secret is another id"
    assert a == tenant_of(key, b"secret one"), "stable"
    assert a != legacy_tenant_of(key) == hashlib.sha256(key.encode()).hexdigest()[:16]
    assert tenant_of("sk-other", b"secret one") != a


def test_the_secret_is_created_once_and_shared(store: Store) -> None:
    first = store.tenant_secret()
    assert len(first) == 32
    other_process = Store.from_url(_url(store))
    assert other_process.tenant_secret() == first == store.tenant_secret()
