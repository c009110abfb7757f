"""fastsd serve on Ray Serve: the same app in every replica, one replica per GPU.

    fastsd serve --model M --ray --replicas 2            # a local Ray instance
    fastsd serve --model M --ray --ray-address auto      # an existing cluster
    serve run fastsd.serve.ray_serve:build_app model=M replicas=2   # Ray's own CLI

Each replica loads the model before Ray routes to it, then batches its own requests with
fastsd's batcher (Ray's handle lets up to max_queue + max_batch requests into a replica,
so they meet there). Replicas take one GPU each where the cluster has GPUs, else one CPU.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import fields

from ray import serve

from .api import Limits
from .app import ServeOptions, create_app

APP_NAME = "fastsd"
GRACEFUL_SHUTDOWN_S = 600.0  # SIGTERM: what is in flight gets this long to finish


@serve.ingress()
class FastsdReplica:
    """One replica: the app over its own Pipeline, loaded before the replica takes requests."""

    def __init__(self, options: ServeOptions):
        self.options = options

    def __serve_build_asgi_app__(self):
        replica = serve.get_replica_context().replica_id.unique_id
        return create_app(self.options, load_in_background=False, replica=replica)


def application(options: ServeOptions, replicas: int | None = 1, autoscaling: dict | None = None,
                gpus_per_replica: float | None = None, actor_options: dict | None = None):
    """A Ray Serve application of `options`' model. `gpus_per_replica` None: 1 where the
    cluster (ray.init must have run) has GPUs, else 0. `autoscaling`: Ray's autoscaling_config,
    passed through (then `replicas` is ignored)."""
    import ray

    if gpus_per_replica is None:
        gpus_per_replica = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    actor = {"num_gpus": gpus_per_replica, "num_cpus": 0 if gpus_per_replica else 1, **(actor_options or {})}
    opts = {"ray_actor_options": actor, "max_ongoing_requests": options.max_queue + options.max_batch,
            "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S, "health_check_period_s": 10}
    if autoscaling:
        opts["autoscaling_config"] = dict(autoscaling)
    else:
        opts["num_replicas"] = replicas or 1
    return serve.deployment(FastsdReplica, name="fastsd", **opts).bind(options)


def build_app(args: dict):
    """Ray Serve's application builder: `serve run fastsd.serve.ray_serve:build_app model=M
    [replicas=N] [backend=B] [max_batch=N] [batch_window_ms=T] [max_queue=Q] [autoscaling=JSON]`."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    autoscaling = args.pop("autoscaling", None)
    if isinstance(autoscaling, str):
        autoscaling = json.loads(autoscaling)
    if "model" not in args:
        raise ValueError("fastsd's Ray Serve app needs model=<checkpoint>")
    kinds = {f.name: f.type for f in fields(ServeOptions)}
    unknown = [k for k in args if k not in kinds or k == "limits"]
    if unknown:
        raise ValueError(f"unknown fastsd serve argument {unknown[0]!r}")
    typed = {}
    for k, v in args.items():
        t = str(kinds[k])
        typed[k] = (int(v) if t == "int" else float(v) if t == "float" else
                    str(v).lower() in ("1", "true", "yes") if t == "bool" else v)
    return application(ServeOptions(limits=Limits(), **typed), replicas, autoscaling)


def run(options: ServeOptions, replicas: int, host: str = "127.0.0.1", port: int = 8000,
        address: str | None = None, autoscaling: dict | None = None) -> int:
    """Start (or join) Ray, serve the app on host:port until SIGTERM / Ctrl+C, then shut
    Serve down gracefully (replicas finish what is in flight). Returns the exit code."""
    import ray

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, replicas), include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    gpus = ray.cluster_resources().get("GPU", 0)
    if 0 < gpus < replicas and not autoscaling:  # Ray would wait for the missing GPUs forever
        ray.shutdown()
        print(f"fastsd: error: {replicas} replicas take one GPU each; the Ray cluster has {gpus:g}", file=sys.stderr)
        return 2
    try:
        try:
            serve.start(http_options={"host": host, "port": port})
            serve.run(application(options, replicas, autoscaling), name=APP_NAME, route_prefix="/")
        except Exception as e:  # noqa: BLE001 - Ray reports a replica that cannot start as a RuntimeError
            print(f"fastsd: error: the Ray Serve application did not start: {str(e).splitlines()[0]}",
                  file=sys.stderr)
            return 2
        print(f"fastsd serve: {options.model} on http://{host}:{port} ({replicas} Ray Serve replica(s))",
              file=sys.stderr)
        for sig in (signal.SIGTERM, signal.SIGINT):  # set last: Ray installs its own on the way up
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
        # graceful: deleting the application lets each replica finish what it holds (its
        # responses still go out through the proxy) before it stops; then Serve goes
        serve.delete(APP_NAME)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
