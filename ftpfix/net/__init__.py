"""The trio shell around ``ftpfix.protocol``: sockets, tasks, timeouts."""
