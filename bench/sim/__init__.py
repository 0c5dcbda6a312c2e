"""Paper-scale discrete-event simulator of a KunServe serving pool.

It imports the operator's planner (kunserve.operator.planner) and the agent's scheduling code
(kunserve.agent.engine.scheduler.Scheduler over BlockManager; a group's GroupAllocator) and runs them in
simulated time with step costs from public hardware figures or from a calibration of the real engine.
CLI: `python -m bench.sim --help`. For the local CPU setup: bench.sim.local.predict_local.
"""
