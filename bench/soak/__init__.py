"""Soak and chaos: hours of mixed OpenAI traffic through the gateway while a seeded schedule drops and
restores groups, SIGKILLs agents, restarts Redis and the controller; then an invariant report (run.py)."""
