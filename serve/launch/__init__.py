"""One composition root per process kind: each module assembles its whole process from the config,
as Ray Serve LLM's `build_openai_app` builds its app from one config; nothing below imports this
package.

- local driver (`llmserve run`, the demo, the integration tests): `local.start_stack` / `stop_stack`
  (the gateway it serves in-process is `serve.gateway.server.build_gateway`)
- gateway replica (Kubernetes): `gateway_replica.build`, Serve import path
  `serve.launch.gateway_replica:build`
- batch worker: `batch_worker.run_batch_worker` (a Ray actor under `llmserve run`,
  `BatchWorkerServer` beside the gateway replicas on Kubernetes)
- engine replica: `engine_replica.build`, Serve import path `serve.launch.engine_replica:build`
"""
