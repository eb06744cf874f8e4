"""Parallelism: the only home of torch.distributed and DeepSpeed (DESIGN.md seams 2 and 4).

- `dist`: process world (a world of one without torchrun), layout, small collectives
- `deepspeed`: our config → DeepSpeed config, the engine, safe checkpoint loading
- `parallelize`: activation checkpointing / compile per block, applied from outside the model
- `balancing`: aux-loss-free router-bias updates with the load counted over the world
"""
