"""API keys: `Authorization: Bearer <key>`, checked against SHA-256 hashes, with per-key model
access and rate limits (the limits themselves live in ratelimit.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from serve.config import ApiKey, AuthSpec, ConfigError
from serve.gateway.errors import APIError


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(spec: AuthSpec) -> list[ApiKey]:
    keys = list(spec.keys)
    if spec.keys_file:
        try:
            raw = yaml.safe_load(Path(spec.keys_file).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"auth.keys_file {spec.keys_file}: {e}") from e
        entries = raw.get("keys", raw) if isinstance(raw, dict) else raw
        if not isinstance(entries, list):
            raise ConfigError(f"auth.keys_file {spec.keys_file} must hold a list of keys")
        try:
            keys += [ApiKey.model_validate(e) for e in entries]
        except ValueError as e:
            raise ConfigError(f"auth.keys_file {spec.keys_file}: {e}") from e
    # A key's name owns its files, batches, responses, rate buckets and cost: two keys of one
    # name would share all of them.
    names = [k.name for k in keys]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"API key names must be unique (auth.keys and auth.keys_file together); "
                          f"used more than once: {twice}")
    return keys


class KeyStore:
    def __init__(self, spec: AuthSpec) -> None:
        self.enabled = spec.enabled
        self._by_hash = {k.sha256: k for k in load_keys(spec)} if spec.enabled else {}
        if self.enabled and not self._by_hash:
            raise ConfigError("auth is enabled but no API keys are configured (auth.keys or auth.keys_file)")

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The caller's key, or None when auth is off. Raises a 401 OpenAI error otherwise."""
        if not self.enabled:
            return None
        if not authorization or not authorization.startswith("Bearer "):
            raise APIError(401, "You didn't provide an API key. You need to provide your API key in an "
                                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                           code="invalid_api_key")
        key = self._by_hash.get(hash_key(authorization[7:].strip()))
        if key is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return key

    def all(self) -> list[ApiKey]:
        return list(self._by_hash.values())

    def by_name(self, name: str) -> ApiKey | None:
        """The key a stored object (a batch) names as its owner; None if it no longer exists."""
        return next((k for k in self._by_hash.values() if k.name == name), None)

    @staticmethod
    def allows(key: ApiKey | None, model: str) -> bool:
        return key is None or "*" in key.models or model in key.models


def keys_json(keys: list[ApiKey]) -> str:
    return json.dumps([k.model_dump() for k in keys])
