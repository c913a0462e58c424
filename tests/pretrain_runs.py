"""Several runs of the entry point in one set of processes, one after another.

    python -m torch.distributed.run --nproc-per-node 8 tests/pretrain_runs.py plan.json

plan.json: ``{"runs": [{"name": ..., "argv": [...], "expect_error": null}], "report": path}``.
Each run calls ``megatron_null_moe.pretrain_gpt.main(argv)``, Megatron's ``pretrain`` with
the plugin; between runs Megatron's global state is reset and the process groups the run
created are destroyed, so the next run may take another parallel layout on the same ranks.
Starting 8 gloo processes costs about 1.5 min of imports on 2 cores, a run a few seconds.

A run with ``expect_error`` (a substring) must fail with it, an exception or the entry
point's one-line refusal (exit status 2); its message is kept. The report
(written by rank 0): run name -> {"ok": bool, "error": message or None}. An unexpected
failure stops the launch (the ranks may be out of step).
"""

import contextlib
import gc
import io
import json
import sys
import time
import traceback

import torch


def release_megatron_state() -> None:
    """Megatron's global state after a run, reset: arguments, timers, TensorBoard writer
    (closed, so its events are on disk), microbatch calculator, model-parallel state and
    every process group but the default one (Megatron's destroy_model_parallel frees only its
    gloo twins; gloo groups left alive keep their threads).

    Megatron's MoE token dispatchers keep the last step's routing probabilities, whose
    autograd graph reaches the gradient hooks DDP put on the parameters: a reference cycle
    through autograd's C++ nodes that Python's collector cannot free, which would keep each
    finished run's model, optimizer and process groups (about 60 threads a rank) alive.
    """
    import megatron.training.checkpointing as checkpointing
    import megatron.training.global_vars as global_vars
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher
    from megatron.training.training import destroy_global_state
    from torch.distributed import distributed_c10d

    writer = global_vars._GLOBAL_TENSORBOARD_WRITER
    if writer is not None:
        writer.close()
    destroy_moe_metrics_tracker()
    destroy_global_state()
    checkpointing.set_loaded_iteration(None)
    for dispatcher in [o for o in gc.get_objects() if issubclass(type(o), MoETokenDispatcher)]:
        for name, value in list(vars(dispatcher).items()):
            if torch.is_tensor(value) and value.grad_fn is not None:
                setattr(dispatcher, name, None)
    gc.collect()
    for group in list(distributed_c10d._world.pg_map):
        if group is not distributed_c10d.GroupMember.WORLD:
            torch.distributed.destroy_process_group(group)


class _Tee(io.StringIO):
    """Standard error, also kept: the entry point prints a refusal as one line (rank 0)."""

    def write(self, text: str) -> int:
        sys.__stderr__.write(text)
        return super().write(text)


def run(argv: list, expect_error: str | None) -> dict:
    from megatron_null_moe.pretrain_gpt import main

    printed = _Tee()
    try:
        with contextlib.redirect_stderr(printed):
            main(argv)
    except SystemExit as refused:  # a refusal: one "error:" line on rank 0, exit status 2 on all
        errors = [line for line in printed.getvalue().splitlines() if ": error: " in line]
        speaks = torch.distributed.get_rank() == 0
        if (expect_error is None or refused.code != 2
                or (speaks and not any(expect_error in line for line in errors))):
            raise
        return {"ok": False, "error": errors[-1] if errors else None}
    except Exception as error:  # noqa: BLE001 - reported, or raised again when unexpected
        message = f"{type(error).__name__}: {error}"
        if expect_error is None or expect_error not in message:
            traceback.print_exc()
            raise
        return {"ok": False, "error": message}
    finally:
        release_megatron_state()
    if expect_error is not None:
        raise RuntimeError(f"expected an error with {expect_error!r}; the run succeeded")
    return {"ok": True, "error": None}


def main(plan_path: str) -> None:
    with open(plan_path) as file:
        plan = json.load(file)
    report = {}
    for entry in plan["runs"]:
        print(f"pretrain_runs: starting {entry['name']}", flush=True)
        started = time.monotonic()
        report[entry["name"]] = run(entry["argv"], entry.get("expect_error"))
        torch.distributed.barrier()
        report[entry["name"]]["seconds"] = round(time.monotonic() - started, 1)
    if torch.distributed.get_rank() == 0:
        with open(plan["report"], "w") as file:
            json.dump(report, file, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
