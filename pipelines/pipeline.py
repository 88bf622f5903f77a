"""The distillery DAG for Kubeflow Pipelines v2, built from the steps' components.

    distillery compile --preset small --out pipeline.yaml   # upload in the Kubeflow UI
    distillery run --preset tiny --out runs/tiny             # the same DAG with kfp.local

The step configs are pipeline parameters (one mapping per step), their defaults baked in from
the chosen preset of params.yaml at compile time, so a user can change any of them in the
Kubeflow UI's run form. `source_uri` empty means the built-in synthetic sample set; otherwise it
is a path that the component's container can read (a mounted volume): object-store URIs
(gs://, s3://) are not read yet.
"""


from typing import Any

from kfp import compiler, dsl

from components.compress import component as compress
from components.data import component as data
from components.registry import component as registry
from components.serve import component as serve
from components.train import component as training
from pipelines.local import PIPELINE_NAME
from pipelines.params import PipelineParams


def build_pipeline(params: PipelineParams) -> Any:
    """The pipeline function, with `params` as its parameters' defaults."""
    p = params.as_dict()

    @dsl.pipeline(name=PIPELINE_NAME, description="Raw data in, a served and versioned language model out.")
    def distillery(
        source_uri: str = "",
        source_config: dict = p["source"],
        generate_config: dict = p["generate"],
        validate_config: dict = p["validate"],
        filter_config: dict = p["filter"],
        split_config: dict = p["split"],
        tokenizer_config: dict = p["tokenizer"],
        model_config: dict = p["model"],
        train_config: dict = p["train"],
        reinforce_config: dict = p["reinforce"],
        finetune_config: dict = p["finetune"],
        evaluate_config: dict = p["evaluate"],
        distill_config: dict = p["distill"],
        quantize_config: dict = p["quantize"],
        serve_config: dict = p["serve"],
        registry_config: dict = p["registry"],
    ):
        ingest = data.ingest(source_uri=source_uri, source_config=source_config, generate_config=generate_config)
        ingest.set_display_name("ingest")
        ingest.set_caching_options(False)  # it reads a path whose content KFP's cache key cannot see
        validate = data.validate(raw=ingest.outputs["raw"], source_config=source_config,
                                 validate_config=validate_config)
        validate.set_display_name("validate")
        kept = data.filter_rows(clean=validate.outputs["clean"], filter_config=filter_config)
        kept.set_display_name("filter")
        split = data.split(kept=kept.outputs["kept"], split_config=split_config)
        split.set_display_name("split")
        base = training.train_base(splits=split.outputs["splits"], tokenizer_config=tokenizer_config,
                                   model_config=model_config, train_config=train_config)
        base.set_display_name("train base")
        reinforce = training.train_reinforce(base_model=base.outputs["model"], splits=split.outputs["splits"],
                                             reinforce_config=reinforce_config)
        reinforce.set_display_name("train reinforce (GRPO)")
        finetune = training.train_finetune(init_model=reinforce.outputs["model"], splits=split.outputs["splits"],
                                           finetune_config=finetune_config)
        finetune.set_display_name("train finetune")
        evaluation = training.evaluate_stages(base_model=base.outputs["model"],
                                              reinforce_model=reinforce.outputs["model"],
                                              finetune_model=finetune.outputs["model"],
                                              splits=split.outputs["splits"], evaluate_config=evaluate_config)
        evaluation.set_display_name("evaluate stages")
        student = compress.distill(teacher=finetune.outputs["model"], splits=split.outputs["splits"],
                                   distill_config=distill_config)
        student.set_display_name("distill")
        int8 = compress.quantize(float_model=student.outputs["model"], splits=split.outputs["splits"],
                                 quantize_config=quantize_config)
        int8.set_display_name("quantize (INT8)")
        repo = serve.serve_export(model=int8.outputs["model"], serve_config=serve_config)
        repo.set_display_name("serve.export (Triton repository)")
        checked = serve.serve_check(repository=repo.outputs["repository"], serve_config=serve_config)
        checked.set_display_name("serve.check (real tritonserver)")
        checked.set_caching_options(False)  # it tests a live server: a cached pass proves nothing
        promoted = registry.promote(model=int8.outputs["model"], check=checked.outputs["check"],
                                    registry_config=registry_config)
        promoted.set_display_name("registry.promote (staging, gated)")
        promoted.set_caching_options(False)  # it changes the registry

    return distillery


def compile_pipeline(params: PipelineParams, out: str) -> None:
    """Write the pipeline's IR YAML to `out`."""
    compiler.Compiler().compile(build_pipeline(params), package_path=out)
