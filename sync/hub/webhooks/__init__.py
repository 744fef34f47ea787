"""Webhooks: the hub posts fleet events to operators' URLs, signed, retried, queued on disk.

    config.py    ``<hub>/webhooks.toml``: the endpoints, their secrets and event filters
    signing.py   the body, the headers and the HMAC-SHA256 signature (and a verifier)
    events.py    which MQTT messages are events, and what each event's body says
    store.py     the SQLite queue (one per hub, per endpoint rows) and what was already seen
    delivery.py  one sender per endpoint: POST, backoff with jitter, Retry-After, give-up rules
    service.py   `edgefleet hub webhooks`: MQTT in, the store between, the senders out

Nothing here signs releases or changes what devices run: it only reads the broker and
tells others what it saw (docs/operations.md, "Webhooks").
"""
