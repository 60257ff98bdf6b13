"""pdserve's load generator: drive a cluster, report per-phase latency percentiles, throughput,
SLO attainment, goodput and errors.

One job per module:
- `distributions`: length distributions (fixed, uniform, normal, lognormal) from short specs;
- `workloads`: what to send (random lengths, shared-prefix groups, ShareGPT, traffic classes);
- `arrivals`: when to send (poisson, bursts, closed-loop concurrency) and the run's limits;
- `backends` / `grpc_backend` / `openai_backend`: how to send (the driver interface; pdserve's
  gRPC API; the OpenAI-compatible HTTP API), built by name in `backend_factory`;
- `record`: what one request measured; `runner`: a run (or a sweep) -> records;
- `stats`: records -> the report; `report`: console table, JSON files, compare;
  `plots`: PNG plots; `bench`: run -> files; `cli`: `pdserve bench`.
"""
