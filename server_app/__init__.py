"""Server side of staleflower: the ServerApp, the event engine, the clock and the node profiles."""
