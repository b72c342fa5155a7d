"""FLUX.1 through xDiT with fastusp: ``--attention_backend fastusp`` (or ``fastusp_fp8``, ``fastusp_overlap``).

Same flags as xDiT's ``examples/flux_example.py``::

    torchrun --nproc_per_node=2 examples/flux_example.py --model black-forest-labs/FLUX.1-dev \\
        --attention_backend fastusp --ulysses_degree 2 --height 1024 --width 1024 \\
        --num_inference_steps 28 --prompt "a cat playing the cello"

Also runs as ``torchrun ... -m fastusp_xdit.apps.run examples/flux_example.py ...``.
"""
from fastusp_xdit.xdit import activate

activate()  # before xfuser is imported: registers the fastusp backends (and the CPU compat layer)

import torch  # noqa: E402
from xfuser import xFuserFluxPipeline  # noqa: E402

import xdit_example_common as common  # noqa: E402


def main():
    args, engine_args, engine_config, input_config = common.parse_xdit_args()
    dtype = common.dtype(torch.bfloat16)
    engine_config.runtime_config.dtype = dtype
    pipe = xFuserFluxPipeline.from_pretrained(
        pretrained_model_name_or_path=engine_config.model_config.model,
        engine_config=engine_config,
        cache_args={
            "use_teacache": engine_args.use_teacache,
            "use_fbcache": engine_args.use_fbcache,
            "rel_l1_thresh": 0.12,
            "return_hidden_states_first": False,
            "num_steps": input_config.num_inference_steps,
        },
        torch_dtype=dtype,
    )
    pipe = common.place(pipe, args, "text_encoder_2", offload=args.enable_sequential_cpu_offload)
    common.prepare(pipe, input_config, steps=input_config.num_inference_steps)

    output, elapsed, peak = common.generate(
        pipe,
        input_config,
        max_sequence_length=input_config.max_sequence_length,
        guidance_scale=input_config.guidance_scale,
    )
    common.save_and_finish(output, "flux", engine_args, engine_config, input_config, elapsed, peak,
                           pipe.is_dp_last_group())


if __name__ == "__main__":
    main()
