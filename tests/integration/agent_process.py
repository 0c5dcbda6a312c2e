"""Start and stop a real `kunserve agent` process on loopback for tests (see kunserve.agent.launch)."""

from kunserve.agent.launch import REPO, SOURCE_ROOTS, AgentProcess, start_agent

__all__ = ["REPO", "SOURCE_ROOTS", "AgentProcess", "start_agent"]
