"""What one gateway serves: models, LoRA adapters and routes, as configured and as changed at run time.

Every change goes through a method (an adapter loaded after start, a route moved to a promoted
student), so a test can make the change the lifecycle loop makes, and no caller edits the maps.
Each route is swapped by one dict assignment: a request sees the old route or the new, never half.
"""

from __future__ import annotations

from typing import Literal

from serve.config import Config, ModelSpec, RouteSpec
from serve.policies.cost import Price


def _price(p: object) -> Price:
    return Price(p.input_per_million, p.output_per_million)  # type: ignore[attr-defined]


class Catalog:
    def __init__(self, config: Config) -> None:
        self.config = config
        # Model or adapter name -> the base model spec whose replicas serve it.
        self._spec: dict[str, ModelSpec] = {}
        self._price: dict[str, Price] = {}
        # Adapter name -> the path its weights were loaded from (configured or runtime), and the
        # content digest of those weights when known (runtime loads; configured ones are unhashed).
        self._adapter_path: dict[str, str] = {}
        self._adapter_digest: dict[str, str] = {}
        for m in config.models:
            self._spec[m.name] = m
            self._price[m.name] = _price(m.price)
            for a in m.adapters:
                self._spec[a.name] = m
                self._price[a.name] = _price(a.price or m.price)
                self._adapter_path[a.name] = a.path
        # A plain model name is a route of its own: one target, no cache, no fallback.
        self._routes: dict[str, RouteSpec] = {n: RouteSpec(name=n, target=n) for n in self._spec}
        self._routes.update({r.name: r for r in config.routes})

    # ---- reads ---------------------------------------------------------------------------------
    def spec(self, name: str) -> ModelSpec | None:
        """The base model serving `name` (a model or an adapter)."""
        return self._spec.get(name)

    def price(self, name: str) -> Price:
        return self._price.get(name, Price())

    def route(self, name: str) -> RouteSpec | None:
        return self._routes.get(name)

    def adapter_path(self, name: str) -> str | None:
        return self._adapter_path.get(name)

    def adapter_digest(self, name: str) -> str | None:
        """Digest of the weights `name` was loaded from at run time; None if never hashed."""
        return self._adapter_digest.get(name)

    def model_names(self) -> list[str]:
        """Models and adapters (configured first, then runtime ones), for /v1/models."""
        return list(self._spec)

    def is_configured_route(self, name: str) -> bool:
        return self.config.route(name) is not None

    # ---- changes -------------------------------------------------------------------------------
    def add_adapter(self, name: str, base: str, path: str, digest: str | None = None) -> bool:
        """Serve adapter `name` (weights at `path`, content `digest`) on `base`'s replicas, or
        record that it was reloaded from new weights. False if `base` is not a served model or
        `name` is taken by something else (a model, or an adapter of another base)."""
        spec = self._spec.get(base)
        if spec is None or spec.name != base:
            return False
        if name in self._spec and (self._adapter_path.get(name) is None or self._spec[name].name != base):
            return False
        self._spec[name] = spec
        self._price.setdefault(name, self._price[base])  # a configured adapter keeps its own price
        self._adapter_path[name] = path
        if digest:
            self._adapter_digest[name] = digest
        else:
            self._adapter_digest.pop(name, None)
        self._routes.setdefault(name, RouteSpec(name=name, target=name))
        return True

    def override_route(self, route: str, field: Literal["student", "target"], model: str,
                       min_mean_logprob: float | None = None) -> bool:
        """Point a configured route's student (cascade) or target at `model`, a promoted student
        with the cascade threshold calibrated for it where given. True if it changed."""
        original = self.config.route(route)
        if original is None or model not in self._spec:
            return False
        if field == "student" and original.cascade is not None:
            cascade: dict[str, object] = {"student": model}
            if min_mean_logprob is not None:
                cascade["min_mean_logprob"] = min_mean_logprob
            new = original.model_copy(update={"cascade": original.cascade.model_copy(update=cascade)})
        elif field == "target" and original.target is not None:
            new = original.model_copy(update={"target": model})
        else:
            return False
        if self._routes.get(route) == new:
            return False
        self._routes[route] = new
        return True

    def reset_route(self, route: str) -> bool:
        """Put a configured route back as configured (its override was rolled back). True if it changed."""
        original = self.config.route(route)
        if original is None or self._routes.get(route) == original:
            return False
        self._routes[route] = original
        return True
