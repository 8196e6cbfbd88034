"""loradock: the console script and what every package shares."""
