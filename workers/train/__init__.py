"""Parallel stage A: the worker body, its launchers (Ray Train's TorchTrainer, torchrun), FSDP2 sharding
applied from outside the model code, sharded loading of large teachers, distributed checkpoints."""
