"""Real servers on loopback for tests/ and bench/ alike, so it is a package of its own."""
