"""Adapters that make kvstored the KV-cache store of an inference engine.

Each module imports its engine only when it is itself imported, so
``import kvstore`` never needs LMCache, SGLang or vLLM:

* :mod:`kvstore.integrations.lmcache`: an LMCache (0.5.x) remote storage plugin,
  ``remote_storage_plugins: [kvstore]``.
* :mod:`kvstore.integrations.sglang`: an SGLang HiCache storage backend,
  ``--hicache-storage-backend dynamic``.
* :mod:`kvstore.integrations.vllm`: a vLLM V1 KV connector, ``kv_connector_module_path``.

Their configuration is described in ``docs/integrations.md``; the options they share
(address, namespace, token, TLS, timeout) are read by :func:`client_from_options`.
"""
from ._config import ClientOptions, client_from_options, lookup_prefix

__all__ = ["ClientOptions", "client_from_options", "lookup_prefix"]
