"""The OpenAI Batch API (/v1/files, /v1/batches), its durable store and its worker."""
