"""Engine wiring: configured models become Ray Serve LLM deployments of real vLLM engines."""
