"""The shipped accelerate configs (configs/accelerate/*.yaml), read as `accelerate launch
--config_file` reads them: its own config loading and launch checks turn each file into the
environment it hands the training processes, and from that environment accelerate builds the
FSDP or DeepSpeed plugin the Accelerator uses. Nothing is launched: no process, no GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def launch_environment(name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    """`accelerate launch --config_file configs/accelerate/NAME.yaml --num_processes 2 -m pipeline sft`
    up to the start of its processes: the parsed arguments and the loaded config file, with the
    environment the processes would get set here."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ROOT / f"configs/accelerate/{name}.yaml"),
                                               "--num_processes", "2", "-m", "pipeline", "sft"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as launch_command does before deepspeed_launcher
        fields = [*defaults.deepspeed_config, *(["mixed_precision"] if mixed_precision_from_config else [])]
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return args, defaults


def test_ddp_is_plain_multi_gpu_data_parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    args, defaults = launch_environment("ddp", monkeypatch)
    assert defaults.distributed_type == "MULTI_GPU" and args.multi_gpu
    assert not args.use_fsdp and not args.use_deepspeed
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert "ACCELERATE_USE_FSDP" not in os.environ and "ACCELERATE_USE_DEEPSPEED" not in os.environ


def test_fsdp_is_fsdp2_fully_sharded_with_sharded_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy, StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    args, defaults = launch_environment("fsdp", monkeypatch)
    assert defaults.distributed_type == "FSDP" and args.use_fsdp
    assert os.environ["ACCELERATE_USE_FSDP"] == "true" and os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16"
    plugin = FullyShardedDataParallelPlugin()  # from the environment, as the Accelerator builds it
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FSDP2's full sharding: params freed after each forward
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy  # each decoder layer its own unit
    assert not isinstance(plugin.cpu_offload, CPUOffloadPolicy)  # parameters stay on the GPUs
    assert plugin.cpu_ram_efficient_loading is True and plugin.activation_checkpointing is False


def test_zero3_is_deepspeed_stage_3_without_offload_saving_16bit_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from accelerate.utils import DeepSpeedPlugin

    args, defaults = launch_environment("zero3", monkeypatch)
    assert defaults.distributed_type == "DEEPSPEED" and args.use_deepspeed
    assert os.environ["ACCELERATE_USE_DEEPSPEED"] == "true" and os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16"
    plugin = DeepSpeedPlugin()  # from the environment, as the Accelerator builds it
    assert plugin.zero_stage == 3 and plugin.hf_ds_config.is_zero3()
    assert plugin.offload_optimizer_device == plugin.offload_param_device == "none"
    assert plugin.zero3_init_flag is True  # weights are partitioned as the model is built
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # the final save is full weights
    # the batch sizes and accumulation are left to TrainingArguments
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto"
