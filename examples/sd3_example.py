"""Stable Diffusion 3 through xDiT with fastusp: ``--attention_backend fastusp`` (or ``fastusp_fp8``).

Same flags as xDiT's ``examples/sd3_example.py``; CFG parallel composes with fastusp::

    torchrun --nproc_per_node=4 examples/sd3_example.py \\
        --model stabilityai/stable-diffusion-3-medium-diffusers --attention_backend fastusp \\
        --ulysses_degree 2 --use_cfg_parallel --num_inference_steps 28 --prompt "a cat playing the cello"

Also runs as ``torchrun ... -m fastusp_xdit.apps.run examples/sd3_example.py ...``.
"""
from fastusp_xdit.xdit import activate

activate()  # before xfuser is imported: registers the fastusp backends (and the CPU compat layer)

import torch  # noqa: E402
from xfuser import xFuserStableDiffusion3Pipeline  # noqa: E402

import xdit_example_common as common  # noqa: E402


def main():
    args, engine_args, engine_config, input_config = common.parse_xdit_args()
    pipe = xFuserStableDiffusion3Pipeline.from_pretrained(
        pretrained_model_name_or_path=engine_config.model_config.model,
        engine_config=engine_config,
        torch_dtype=common.dtype(torch.float16),
    )
    pipe = common.place(pipe, args, "text_encoder_3")
    common.prepare(pipe, input_config)

    output, elapsed, peak = common.generate(
        pipe,
        input_config,
        negative_prompt=input_config.negative_prompt,
        max_sequence_length=input_config.max_sequence_length,
        guidance_scale=input_config.guidance_scale,
    )
    common.save_and_finish(output, "stable_diffusion_3", engine_args, engine_config, input_config, elapsed, peak,
                           pipe.is_dp_last_group())


if __name__ == "__main__":
    main()
