"""The serve section of params.yaml loads strictly into the typed configs."""

from __future__ import annotations

import pytest
import yaml

from components.config import ConfigError, from_dict
from components.serve.config import ServeConfig

SECTION = """
serve:
  export: {name: distillery, max_batch_size: 8, dynamic_batching: true, max_queue_delay_us: 2000,
           instances: 1, torch_threads: 1, max_tokens_default: 32, max_tokens_limit: 128, onnx: true}
  server: {startup_timeout_s: 120, restrict: [model-repository, shared-memory, logging, trace]}
  check: {prompts: ["1 + 2 =", "What is 3 * 4?"], max_tokens: 16, atol: 1.0e-4}
  loadtest: {concurrency: [1, 4, 16], requests_per_level: 64, model: generate, batching: [true, false]}
"""


def test_the_suggested_section_loads():
    cfg = from_dict(ServeConfig, yaml.safe_load(SECTION)["serve"], "serve")
    assert cfg.export.max_tokens_limit == 128 and cfg.loadtest.concurrency == [1, 4, 16]
    assert cfg.check.protocols == ["http", "grpc"]


@pytest.mark.parametrize("bad, where", [
    ({"export": {"max_batch": 4}}, "serve.export.max_batch: unknown key; did you mean 'max_batch_size'?"),
    ({"server": {"restrict": ["everything"]}}, "serve.server.restrict: unknown API"),
    ({"loadtest": {"protocol": "tcp"}}, "serve.loadtest.protocol"),
    ({"export": {"max_tokens_default": 300}}, "serve.export.max_tokens_default"),
])
def test_mistakes_are_named(bad, where):
    with pytest.raises(ConfigError, match=where.replace("?", r"\?").replace(".", r"\.")):
        from_dict(ServeConfig, bad, "serve")
