"""Qwen-Image through xDiT with fastusp: ``--attention_backend fastusp`` (or ``fastusp_fp8``).

xDiT 0.7.0 serves Qwen-Image only through its runner (``xdit --model Qwen/Qwen-Image``, or
``fastusp-xdit-runner``): there is no ``xFuserQwenImagePipeline``. This script takes the flags of xDiT's
other examples and builds what the runner builds: diffusers' ``QwenImagePipeline`` around xfuser's
sequence-parallel ``xFuserQwenImageTransformerWrapper``, with xfuser's runtime state::

    torchrun --nproc_per_node=2 examples/qwenimage_example.py --model Qwen/Qwen-Image \\
        --attention_backend fastusp --ulysses_degree 2 --height 928 --width 1664 \\
        --num_inference_steps 50 --guidance_scale 4.0 --negative_prompt " " --prompt "a cat playing the cello"

``--guidance_scale`` is Qwen-Image's ``true_cfg_scale`` (as in xDiT's runner). Also runs as
``torchrun ... -m fastusp_xdit.apps.run examples/qwenimage_example.py ...``.
"""
from fastusp_xdit.xdit import activate

activate()  # before xfuser is imported: registers the fastusp backends (and the CPU compat layer)

import torch  # noqa: E402
from diffusers import QwenImagePipeline  # noqa: E402
from xfuser.core.distributed import initialize_runtime_state, is_dp_last_group  # noqa: E402
from xfuser.model_executor.models.transformers.transformer_qwen import (  # noqa: E402
    xFuserQwenImageTransformerWrapper,
)

import xdit_example_common as common  # noqa: E402


def main():
    args, engine_args, engine_config, input_config = common.parse_xdit_args()
    dtype = common.dtype(torch.bfloat16)
    model = engine_config.model_config.model
    transformer = xFuserQwenImageTransformerWrapper.from_pretrained(model, subfolder="transformer", torch_dtype=dtype)
    pipe = QwenImagePipeline.from_pretrained(model, transformer=transformer, torch_dtype=dtype)
    pipe = common.place(pipe, args, "text_encoder")  # xDiT's flag for its text encoders; Qwen-Image's is Qwen2.5-VL
    initialize_runtime_state(pipe, engine_config)

    output, elapsed, peak = common.generate(
        pipe,
        input_config,
        negative_prompt=input_config.negative_prompt,
        true_cfg_scale=input_config.guidance_scale,
        max_sequence_length=input_config.max_sequence_length,
    )
    common.save_and_finish(output, "qwen_image", engine_args, engine_config, input_config, elapsed, peak,
                           is_dp_last_group())


if __name__ == "__main__":
    main()
