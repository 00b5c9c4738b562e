"""Small gRPC helpers shared by every service: server start/stop, channels, status conversion."""
