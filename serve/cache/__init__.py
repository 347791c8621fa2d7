"""The head cache's storage: an in-process LRU in front of Redis."""
