"""The pure scheduler: continuous batching per server, token budget, chunked prefill, FIFO or
shortest-first admission, KV reservation of prompt + max output, no preemption; bad input."""
import pytest

from moe_edge.serving import scheduler as s


def _run(opts, reqs, servers=1):
  """Drive plan/advance until every request is done; reqs: (server, prompt, output) all
  arriving at once. Returns the plans and the events."""
  queues = tuple(s.ServerQueue.empty(opts.kv_budget(n, servers)) for n in range(servers))
  for i, (n, p, o) in enumerate(reqs):
    queues = queues[:n] + (s.arrive(queues[n], s.Waiting(i, p, o)),) + queues[n + 1:]
  plans, events = [], []
  while any(q.waiting or q.running for q in queues):
    plan = s.plan_step(queues, opts)
    assert not s.idle(plan)
    queues, ev = s.advance(queues, plan)
    plans.append(plan)
    events.append(ev)
  return plans, events, queues


def test_chunked_prefill_then_one_decode_per_step_and_kv_returned():
  opts = s.SchedulerOptions(max_batch=2, token_budget=8, prefill_chunk=5, kv_tokens=40)
  plans, events, queues = _run(opts, [(0, 12, 3)])
  chunks = [c for p in plans for c in p[0].prefill]
  assert [(c.start, c.length) for c in chunks] == [(0, 5), (5, 5), (10, 2)]
  assert events[2].first_token == ((0, 0),)         # the last prompt chunk yields token 1
  assert [d.position for p in plans for d in p[0].decode] == [12, 13]  # feeds tokens 1 and 2
  assert events[-1].finished == ((0, 0),) and len(plans) == 5
  assert queues[0].kv_free == 40 and not queues[0].running


def test_budget_decodes_first_then_prefill_in_admission_order():
  opts = s.SchedulerOptions(max_batch=3, token_budget=6, prefill_chunk=4, kv_tokens=100)
  plans, _, _ = _run(opts, [(0, 2, 5), (0, 9, 2), (0, 9, 2)])
  # step 0: request 0 prefills 2, request 1 gets 4, request 2 nothing (budget 6 spent)
  assert [(c.request, c.length) for c in plans[0][0].prefill] == [(0, 2), (1, 4)]
  assert [(r, slot) for r, slot in plans[0][0].admit] == [(0, 0), (1, 1), (2, 2)]
  # step 1: request 0 decodes (1 token), the remaining 5 go to request 1 (4) and request 2 (1)
  assert [d.request for d in plans[1][0].decode] == [0]
  assert [(c.request, c.length) for c in plans[1][0].prefill] == [(1, 4), (2, 1)]
  for p in plans:
    assert p[0].tokens <= opts.token_budget


def test_admission_reserves_prompt_plus_max_output_fifo_without_overtaking():
  # KV budget 20: request 0 reserves 12; request 1 (needs 10) must wait, and request 2 (needs
  # 4, would fit) does not overtake it under FIFO.
  opts = s.SchedulerOptions(max_batch=4, token_budget=16, prefill_chunk=16, kv_tokens=20)
  plans, events, _ = _run(opts, [(0, 8, 4), (0, 6, 4), (0, 2, 2)])
  assert [r for r, _ in plans[0][0].admit] == [0]
  admitted_at = {r: i for i, p in enumerate(plans) for r, _ in p[0].admit}
  finished_at = {r: i for i, e in enumerate(events) for _, r in e.finished}
  assert admitted_at[1] == finished_at[0] + 1       # no preemption: waits for the reservation
  assert admitted_at[2] >= admitted_at[1]
  shortest = s.SchedulerOptions(max_batch=4, token_budget=16, prefill_chunk=16, kv_tokens=20,
                                policy="shortest_first")
  plans, _, _ = _run(shortest, [(0, 8, 4), (0, 6, 4), (0, 2, 2)])
  assert [r for r, _ in plans[0][0].admit] == [2, 1]  # 4 + 10 <= 20, then 12 does not fit


def test_servers_are_independent_and_slots_are_reused():
  opts = s.SchedulerOptions(max_batch=1, token_budget=4, prefill_chunk=4, kv_tokens=10)
  plans, _, _ = _run(opts, [(0, 3, 2), (1, 3, 1), (0, 2, 1)], servers=2)
  assert plans[0][1].prefill[0].request == 1 and plans[0][0].prefill[0].request == 0
  assert [slot for p in plans for _, slot in p[0].admit] == [0, 0]  # one slot, reused


@pytest.mark.parametrize("kwargs, match", [
    (dict(token_budget=2, max_batch=4), "token_budget .2. must be >= max_batch"),
    (dict(prefill_chunk=0), "prefill_chunk must be a positive integer"),
    (dict(kv_tokens=0), "kv_tokens must be positive"),
    (dict(policy="lifo"), "unknown policy"),
])
def test_bad_options(kwargs, match):
  with pytest.raises(s.SchedulerError, match=match):
    s.SchedulerOptions(**kwargs)


@pytest.mark.parametrize("args, match", [
    ((3, 50, 20, 0), "request 3: prompt .50. \\+ output .20. = 70 tokens exceeds the model's "
                     "context of 64"),
    ((3, 10, 0, 0), "request 3 asks for 0 output tokens"),
    ((3, 0, 5, 0), "request 3 has an empty prompt"),
    ((3, 30, 20, 0), "request 3 needs 50 KV positions but server 0's KV budget is 40; raise "
                     "kv_tokens"),
    ((3, 10, 5, 2), "request 3 is for server 2, but the cluster has servers 0..1"),
])
def test_bad_requests_name_the_request_and_the_fix(args, match):
  opts = s.SchedulerOptions(kv_tokens=40)
  req, prompt, out, server = args
  with pytest.raises(s.SchedulerError, match=match):
    s.check_request(req, prompt, out, server, 2, opts, context=64)
