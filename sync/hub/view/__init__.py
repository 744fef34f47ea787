"""`edgefleet hub view`: a read-only fleet page built from what the broker carries
(server.py: the aiohttp app and its live events; source.py: the MQTT subscriber;
rows.py: what the page shows per device and rollout; history.py: the bounded SQLite
history behind the device charts; static/: the page, written small, no build step)."""
