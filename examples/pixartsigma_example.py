"""PixArt-Sigma through xDiT with fastusp: ``--attention_backend fastusp`` (or ``fastusp_fp8``).

Same flags as xDiT's ``examples/pixartsigma_example.py``::

    torchrun --nproc_per_node=2 examples/pixartsigma_example.py \\
        --model PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --attention_backend fastusp \\
        --ulysses_degree 2 --num_inference_steps 20 --prompt "a cat playing the cello"

Also runs as ``torchrun ... -m fastusp_xdit.apps.run examples/pixartsigma_example.py ...``.
"""
from fastusp_xdit.xdit import activate

activate()  # before xfuser is imported: registers the fastusp backends (and the CPU compat layer)

import torch  # noqa: E402
from xfuser import xFuserPixArtSigmaPipeline  # noqa: E402

import xdit_example_common as common  # noqa: E402


def main():
    args, engine_args, engine_config, input_config = common.parse_xdit_args()
    pipe = xFuserPixArtSigmaPipeline.from_pretrained(
        pretrained_model_name_or_path=engine_config.model_config.model,
        engine_config=engine_config,
        torch_dtype=common.dtype(torch.float16),
    )
    pipe = common.place(pipe, args, "text_encoder")
    common.prepare(pipe, input_config)

    output, elapsed, peak = common.generate(
        pipe,
        input_config,
        use_resolution_binning=input_config.use_resolution_binning,
        guidance_scale=input_config.guidance_scale,
        clean_caption=False,
    )
    common.save_and_finish(output, "pixart_sigma", engine_args, engine_config, input_config, elapsed, peak,
                           pipe.is_dp_last_group())


if __name__ == "__main__":
    main()
