"""3D parallelism for the base stage: pipeline x tensor x data (ZeRO-1) on DeepSpeed.

- `tensor.py`: Megatron column/row-parallel linears and the vocabulary-parallel embedding and
  loss, swapped into the single-device model;
- `pipe.py`: the topology (pp x tp x dp = world), the PipelineModule built from the model's
  layers, the pipelined validation loss;
- `state.py`: checkpoints stored whole (by single-device names), so any topology resumes them;
- `trainer.py`: PipelineTrainer, the engine's Trainer of such a run (the pipelined step).

components/train/engine.py `trainer` chooses it when train.pipeline_parallel or
train.tensor_parallel is above 1; benchmarks/parallel.py measures it.
"""
