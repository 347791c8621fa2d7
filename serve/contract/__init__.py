"""What gateways, batch workers and engines agree on, owned by none of them: the replica registry,
the engine secret, where adapters may be loaded from and the cache directory. Imports nothing from
serve.gateway, serve.engine or serve.batch, so each side depends on this and never on the other."""
