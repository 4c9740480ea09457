"""Helpers of carnet's tests: databases, servers, models, CLI runners, paths."""
