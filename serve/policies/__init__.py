"""Gateway policies: pure functions and small classes that decide from data and do no I/O.

The ingress (serve/gateway) performs every call these decisions imply.
"""
