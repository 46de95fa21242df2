"""The sessionstore WebSocket daemon: a pure protocol module and the server wiring."""
