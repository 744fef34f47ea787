"""Keys, signatures, tokens and TLS: trust decisions made from bytes, with no I/O.

Depends on nothing else of edgefleet's.
"""
