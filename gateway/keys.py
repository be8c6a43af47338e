"""API keys: shown once, stored as SHA-256 hashes, each mapped to a tenant and a service tier.

    gateway-keys --file keys.json create --tenant acme --tier vip
    gateway-keys --file keys.json list
    gateway-keys --file keys.json revoke KEY_ID

A key is `qv-<id>-<secret>`; only the id and the hash of the whole key are stored. Lookups hash
the presented key and compare it with every stored hash in constant time, so neither the answer
nor its timing says which keys exist.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import hmac
import json
import os
import secrets
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    tenant: str
    tier: str
    sha256: str
    created: str
    revoked: bool = False
    requests_per_minute: float = 600
    tokens_per_minute: float = 200_000


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The keys of one JSON file; every change is written back at once (atomically)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.keys: list[ApiKey] = []
        if self.path.exists():
            self.keys = [ApiKey(**k) for k in json.loads(self.path.read_text())["keys"]]

    def create(
        self, tenant: str, tier: str, requests_per_minute: float = 600, tokens_per_minute: float = 200_000
    ) -> tuple[str, ApiKey]:
        """A new key for `tenant` in `tier`: (the key, shown only now; its record)."""
        key_id = secrets.token_hex(4)
        key = f"qv-{key_id}-{secrets.token_urlsafe(32)}"
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        record = ApiKey(key_id, tenant, tier, _digest(key), created, False, requests_per_minute, tokens_per_minute)
        self.keys.append(record)
        self._save()
        return key, record

    def revoke(self, key_id: str) -> ApiKey:
        for i, record in enumerate(self.keys):
            if record.key_id == key_id:
                self.keys[i] = ApiKey(**{**asdict(record), "revoked": True})
                self._save()
                return self.keys[i]
        raise KeyError(f"no key with id {key_id!r}")

    def verify(self, key: str) -> ApiKey | None:
        """The live record of `key`, or None (unknown or revoked: the caller cannot tell which)."""
        digest = _digest(key)
        found = None
        for record in self.keys:  # no early exit: the time spent does not depend on where it is
            if hmac.compare_digest(record.sha256, digest) and not record.revoked:
                found = record
        return found

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps({"keys": [asdict(k) for k in self.keys]}, indent=2) + "\n")
        partial.chmod(0o600)  # hashes only, but nobody else needs to read them
        partial.replace(self.path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gateway-keys", description=__doc__.split("\n\n")[0])
    p.add_argument("--file", type=Path, default=Path("keys.json"), help="the key store")
    sub = p.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="make a key (printed once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--tier", required=True, help="a tier of the repository's table (vip, standard, free)")
    create.add_argument("--requests-per-minute", type=float, default=600, help="request rate limit (token bucket)")
    create.add_argument("--tokens-per-minute", type=float, default=200_000, help="generated-token rate limit")
    sub.add_parser("list", help="ids, tenants, tiers (never the keys)")
    revoke = sub.add_parser("revoke", help="stop a key from working")
    revoke.add_argument("key_id")
    args = p.parse_args(argv)
    store = KeyStore(args.file)
    if args.command == "create":
        key, record = store.create(args.tenant, args.tier, args.requests_per_minute, args.tokens_per_minute)
        print(f"{key}\n(id {record.key_id}, tenant {record.tenant}, tier {record.tier}; the key is not stored: keep it now)")
    elif args.command == "list":
        for k in store.keys:
            limits = f"{k.requests_per_minute:g} req/min, {k.tokens_per_minute:g} tok/min"
            print(f"{k.key_id}  {k.tenant:<20} {k.tier:<10} {limits:<32} {k.created}{'  revoked' if k.revoked else ''}")
    else:
        try:
            store.revoke(args.key_id)
        except KeyError as exc:
            print(f"gateway-keys: error: {exc.args[0]}", file=sys.stderr)
            return 2
        print(f"revoked {args.key_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
