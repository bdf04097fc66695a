"""Test-only hook: let Accelerate run FSDP2 on CPU processes (gloo), so `tests/test_fsdp.py` exercises the real
sharded training and collective saving code paths without a GPU.

Accelerate refuses FSDP when `use_cpu` is set (it keeps `MULTI_CPU` and silently falls back to DDP), although torch's
FSDP2 (`fully_shard`) runs over gloo. When PIPELINE_TEST_FSDP_ON_CPU=1, this hook finishes what Accelerate does on
GPUs: the state becomes `FSDP` with the plugin the Trainer passed, on every rank. It is imported at interpreter start
only because the test puts this folder first on PYTHONPATH; nothing here is used by the package.
"""
import os

if os.environ.get("PIPELINE_TEST_FSDP_ON_CPU") == "1":
    import accelerate.state as _state
    from accelerate.utils import DistributedType as _Type

    _original_init = _state.AcceleratorState.__init__

    def _init(self, *args, fsdp_plugin=None, **kwargs):
        _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == _Type.MULTI_CPU:
            self.distributed_type = _Type.FSDP
            self.fsdp_plugin = fsdp_plugin
            _state.PartialState._shared_state["distributed_type"] = _Type.FSDP  # as AcceleratorState does on GPUs

    _state.AcceleratorState.__init__ = _init
