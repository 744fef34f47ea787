"""Staged rollouts on the hub: the record (record.py), its files (store.py), the fleet as
MQTT shows it (sync/hub/fleet.py), the decision (decide.py, pure) and the changes (actions.py).
The controller that runs them is sync/hub/controller.py."""
