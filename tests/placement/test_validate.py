"""Placement.validate rejects every inconsistent or infeasible placement (issue 14).

Each case starts from one valid placement and breaks exactly one rule, so a validate that skips
that rule (or checks it off by one) fails here: three such bugs passed every other placement
test before this file.
"""
import dataclasses

import numpy as np
import pytest

from moe_edge.core.errors import PlacementError
from moe_edge.core.problem import Placement, slot_table
from _placement_cases import make_problem

N, L, E = 3, 2, 6


@pytest.fixture(scope="module")
def base():
  """A valid placement: expert e of each layer on server e % 3, expert 0 of layer 0 also on
  servers 1 and 2 (replicas), capacity exactly what each server holds."""
  problem = make_problem(n=N, l=L, e=E, seed=1, copies=1.5)
  hosts = np.zeros((N, L, E), bool)
  for e in range(E):
    hosts[e % N, :, e] = True
  hosts[1:, 0, 0] = True
  p = Placement.from_hosts(hosts, problem.model, problem.cluster)
  problem = dataclasses.replace(problem, capacity=p.experts_per_server.astype(np.int64))
  p.validate(problem)
  return problem, p


def changed(p, hosts=None, route=None, slot_expert=None):
  return Placement(p.hosts.copy() if hosts is None else hosts,
                   p.route.copy() if route is None else route,
                   p.slot_expert.copy() if slot_expert is None else slot_expert, p.method)


def over_capacity(problem, p):
  cap = problem.capacity.copy()
  cap[2] -= 1  # one expert over
  return dataclasses.replace(problem, capacity=cap), p


def route_to_non_host(problem, p):
  route = p.route.copy()
  assert route[0, 1, 1] == 1 and not p.hosts[2, 1, 1]  # expert 1 lives on server 1 only
  route[0, 1, 1] = 2
  return problem, changed(p, route=route)


def local_route_of_a_remote_expert(problem, p):
  route = p.route.copy()
  route[0, 1, 1] = 0
  return problem, changed(p, route=route)


def hosted_expert_routed_away(problem, p):
  route = p.route.copy()
  assert p.hosts[1, 0, 0] and p.hosts[2, 0, 0]
  route[1, 0, 0] = 2  # server 2 hosts it too, but server 1 has it locally
  return problem, changed(p, route=route)


def hosted_nowhere(problem, p):
  hosts = p.hosts.copy()
  hosts[:, 1, 4] = False
  return problem, changed(p, hosts=hosts, slot_expert=slot_table(hosts, p.num_slots))


def route_negative(problem, p):
  route = p.route.copy()
  route[2, 0, 3] = -1
  return problem, changed(p, route=route)


def route_past_n(problem, p):
  route = p.route.copy()
  route[2, 0, 3] = N
  return problem, changed(p, route=route)


def float_route(problem, p):
  return problem, changed(p, route=np.where(p.route == 0, np.nan, p.route.astype(float)))


def int_hosts(problem, p):
  return problem, changed(p, hosts=p.hosts.astype(np.int64) * 2)


def route_shape(problem, p):
  return problem, changed(p, route=p.route[:, :1])


def flat_hosts(problem, p):
  return problem, changed(p, hosts=p.hosts.reshape(N, L * E), route=p.route.reshape(N, L * E))


def other_problem(problem, p):
  return make_problem(n=N, l=L, e=E + 2, seed=1), p


def slot_duplicate(problem, p):
  s = p.slot_expert.copy()
  assert s[1, 0, 0] == 0 and s.shape[2] >= 2 and s[1, 0, 1] == 1
  s[1, 0, 1] = 0  # expert 0 in two slots, expert 1 in none
  return problem, changed(p, slot_expert=s)


def slot_of_unhosted_expert(problem, p):
  s = np.concatenate([p.slot_expert, np.full((N, L, 1), -1, np.int32)], axis=2)
  s[0, 1, -1] = 1  # server 0 does not host expert 1 of layer 1
  return problem, changed(p, slot_expert=s)


def slot_missing(problem, p):
  s = p.slot_expert.copy()
  s[2, 1, 0] = -1
  return problem, changed(p, slot_expert=s)


def slot_id_out_of_range(problem, p):
  s = np.concatenate([p.slot_expert, np.full((N, L, 1), -1, np.int32)], axis=2)
  s[0, 0, -1] = E
  return problem, changed(p, slot_expert=s)


CASES = [
    (over_capacity, r"server 2 \(s2\) holds 5 experts but fits 4; over by"),
    (route_to_non_host, r"server 0's tokens for layer 1 expert 1 to server 2, which does not"),
    (local_route_of_a_remote_expert, r"layer 1 expert 1 to server 0, which does not host it"),
    (hosted_expert_routed_away, r"routes a locally hosted expert away"),
    (hosted_nowhere, r"1 experts are hosted nowhere \(first: layer 1, expert 4\)"),
    (route_negative, r"route table points outside \[0, N\)"),
    (route_past_n, r"route table points outside \[0, N\)"),
    (float_route, r"route must be an integer table, got float64"),
    (int_hosts, r"hosts must be a bool table, got int64"),
    (route_shape, r"route shape \(3, 1, 6\) differs from hosts \(3, 2, 6\)"),
    (flat_hosts, r"hosts must be \[N, L, E\], got shape \(3, 12\)"),
    (other_problem, r"placement is \[N, L, E\] = \[3, 2, 6\] but the problem .* is \[3, 2, 8\]"),
    (slot_duplicate, r"server 1, layer 0, expert 0 is hosted 1 time\(s\) but sits in 2 slot"),
    (slot_of_unhosted_expert, r"server 0, layer 1, expert 1 is hosted 0 time\(s\) but sits in 1"),
    (slot_missing, r"server 2, layer 1, expert 2 is hosted 1 time\(s\) but sits in 0 slot"),
    (slot_id_out_of_range, r"expert ids outside \[-1, 6\)"),
]


@pytest.mark.parametrize("breaker,fragment", CASES, ids=[c[0].__name__ for c in CASES])
def test_validate_rejects(base, breaker, fragment):
  problem, p = breaker(*base)
  with pytest.raises(PlacementError, match=fragment):
    p.validate(problem)


def test_capacity_exactly_met_is_feasible(base):
  """The boundary: holding exactly the capacity passes (the base), one less capacity fails."""
  problem, p = base
  assert np.array_equal(p.experts_per_server, problem.capacity)
  p.validate(problem)
