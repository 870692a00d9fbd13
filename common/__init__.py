"""The shared bottom layer: what every other package may use and nothing here
imports back. The ZeroMQ socket helper, free ports, worker roles, the plan
document (the planner writes it, the router reads it), the route-picking
policy (the router runs it, the simulator replays it), request trace records,
and small asyncio helpers."""
