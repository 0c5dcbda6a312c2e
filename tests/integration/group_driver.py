"""Test-side names for kunserve.agent.group_client."""

from kunserve.agent.group_client import Stream, even_ranges, group_spec, metric, reconfigure, status, wait_until

__all__ = ["Stream", "even_ranges", "group_spec", "metric", "reconfigure", "status", "wait_until"]
