"""Counters, explain reports and graph dumps."""
