"""The agent as a process: serve, systemd notification, logs and process-wide settings."""
