"""Shared test helpers: the float64 oracle and its tolerance rule, a naive attention loop, the
devices the tests run on, and the transformers Q-Former fixtures of the M-Hub tests."""
