"""Replicas behind Ray Serve (the optional `ray` extra, `pip install "lmarith[ray]"`). Each
replica builds its own `lmarith.LLM` inside its Ray actor and serves the same OpenAI routes as
`lmarith serve` (`build_app`); Serve's HTTP proxy spreads requests over the replicas and the
controller replaces a replica that dies or fails its health check.

    app = build_deployment(models, presets, replicas=2, kv_cache_bytes=1 << 30)
    url = deploy(app, host="0.0.0.0", port=8000)     # after ray.init(); returns the base URL

`models` and `presets` are those of `build_app` ({name: Model}, {name: Formula}): they are
pickled to the replicas, which load the weights themselves. Every answer carries the header
`x-lmarith-replica` naming the replica that served it."""
from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any, Mapping, Optional

from ..errors import ConfigError, LmarithError
from ..formula import Formula, Model

RAY_EXTRA = 'pip install "lmarith[ray]"'
REPLICA_HEADER = b"x-lmarith-replica"
APP_NAME = "lmarith"


class RayNotInstalledError(LmarithError, ImportError):
    """Ray Serve is needed (replicas were asked for) but is not installed."""


def _serve():
    """ray.serve, imported only when replicas are asked for (ray is an optional extra)."""
    try:
        import ray
        from ray import serve
    except ImportError as error:
        raise RayNotInstalledError(f"replicas behind Ray Serve need ray[serve], which cannot be "
                                   f"imported ({error}); install it with: {RAY_EXTRA}") from None
    return ray, serve


class ReplicaHeader:
    """ASGI middleware that names the replica in every HTTP answer (which one served it)."""

    def __init__(self, app, replica: str) -> None:
        self.app = app
        self.replica = replica.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (REPLICA_HEADER, self.replica)]}
            await send(message)
        await self.app(scope, receive, tagged)


class LmarithReplica:
    """One Serve replica: loads the models into its own LLM when Serve constructs it, then
    hands Serve the FastAPI app of `build_app` over that LLM."""

    def __init__(self, models: Mapping[str, Model], presets: Mapping[str, Formula],
                 llm_kwargs: Mapping[str, Any], api_key: Optional[str]) -> None:
        import lmarith as la
        from .arguments import models_to_load

        self.models, self.presets, self.api_key = dict(models), dict(presets), api_key
        self.llm = la.LLM(models=models_to_load(self.models, self.presets), **llm_kwargs)

    def __serve_build_asgi_app__(self):
        """The app Serve routes this replica's HTTP requests to (called once, after __init__)."""
        from ray import serve

        from .openai.server import build_app

        app = build_app(self.llm, self.models, self.presets, self.api_key)
        replica = serve.get_replica_context().replica_id.unique_id
        app.add_middleware(ReplicaHeader, replica=f"{replica} pid={os.getpid()}")
        return app

    async def check_health(self) -> None:
        """Serve's periodic health check: raises (and Serve replaces the replica) once the
        engine loop no longer answers."""
        await asyncio.to_thread(self.llm.stats)

    def __del__(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()


def llm_kwargs(kv_cache_bytes: Optional[int], max_num_seqs: int, num_threads: Optional[int],
               device: str, tensor_parallel_size: int, kv_cache_dtype: str = "auto") -> dict[str, Any]:
    """The keyword arguments of each replica's LLM; tensor_parallel_size only when above 1,
    kv_cache_dtype only when not "auto"."""
    kwargs: dict[str, Any] = {"max_num_seqs": max_num_seqs, "device": device}
    if kv_cache_bytes is not None:
        kwargs["kv_cache_bytes"] = kv_cache_bytes
    if num_threads is not None:
        kwargs["num_threads"] = num_threads
    if tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = tensor_parallel_size
    if kv_cache_dtype != "auto":
        kwargs["kv_cache_dtype"] = kv_cache_dtype
    return kwargs


def actor_options(device: str, num_threads: Optional[int], tensor_parallel_size: int,
                  extra: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """What Ray reserves for one replica: a CPU per thread of each rank, a GPU per rank on
    cuda; `extra` (Ray's ray_actor_options) overrides any of it."""
    options: dict[str, Any] = {"num_cpus": (num_threads or 1) * tensor_parallel_size}
    if device == "cuda":
        options["num_gpus"] = tensor_parallel_size
    return {**options, **(extra or {})}


def build_deployment(models: Mapping[str, Model], presets: Optional[Mapping[str, Formula]] = None,
                     *, replicas: int = 1, tensor_parallel_size: int = 1,
                     kv_cache_bytes: Optional[int] = None, max_num_seqs: int = 64,
                     num_threads: Optional[int] = None, device: str = "cpu",
                     kv_cache_dtype: str = "auto", api_key: Optional[str] = None,
                     ray_actor_options: Optional[Mapping[str, Any]] = None,
                     deployment_options: Optional[Mapping[str, Any]] = None):
    """The Serve application: `replicas` copies of the OpenAI app, each over its own LLM
    (tensor parallel over `tensor_parallel_size` ranks); presets default to one per model.
    deployment_options go to `serve.deployment` as they are (e.g. health_check_period_s,
    autoscaling_config); max_ongoing_requests defaults to max_num_seqs."""
    if not models:
        raise ConfigError("build_deployment needs at least one model, e.g. {'smol': la.Model(path)}")
    for name, value in (("replicas", replicas), ("tensor_parallel_size", tensor_parallel_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    _, serve = _serve()
    presets = dict(models) if presets is None else dict(presets)
    options = {"name": "LmarithReplica", "num_replicas": replicas,
               "max_ongoing_requests": max_num_seqs,
               "ray_actor_options": actor_options(device, num_threads, tensor_parallel_size,
                                                  ray_actor_options),
               **(deployment_options or {})}
    deployment = serve.deployment(serve.ingress()(LmarithReplica), **options)
    kwargs = llm_kwargs(kv_cache_bytes, max_num_seqs, num_threads, device, tensor_parallel_size,
                        kv_cache_dtype)
    return deployment.bind(dict(models), presets, kwargs, api_key)


def deploy(app, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME,
           route_prefix: str = "/", request_timeout_s: Optional[float] = None) -> str:
    """Start Serve's HTTP proxy on host:port (on the Ray cluster ray.init joined) and run the
    application under route_prefix, waiting until every replica is up; returns its base URL.
    The proxy's options are cluster-wide: a Serve already running keeps its host and port."""
    _, serve = _serve()
    http_options: dict[str, Any] = {"host": host, "port": port}
    if request_timeout_s is not None:
        http_options["request_timeout_s"] = request_timeout_s
    serve.start(http_options=http_options)
    serve.run(app, name=name, route_prefix=route_prefix)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def run_ray_server(models: Mapping[str, Model], presets: Mapping[str, Formula], host: str,
                   port: int, replicas: int, api_key: Optional[str] = None,
                   **engine: Any) -> None:
    """`lmarith serve --ray-replicas N`: join the Ray cluster in $RAY_ADDRESS (else start a
    local one), deploy, and serve until interrupted; Serve is shut down on the way out."""
    ray, serve = _serve()
    app = build_deployment(models, presets, replicas=replicas, api_key=api_key, **engine)
    ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"include_dashboard": False}))
    try:
        url = deploy(app, host, port)
        print(f"lmarith: {replicas} replicas behind Ray Serve; models {', '.join(models)}; "
              f"presets {', '.join(presets)}; {url}/v1", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()
