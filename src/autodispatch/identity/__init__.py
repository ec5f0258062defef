"""Accounts, passwords and tokens: who the caller is."""
