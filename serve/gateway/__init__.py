"""The OpenAI-compatible gateway: one ASGI app in front of every engine deployment."""
