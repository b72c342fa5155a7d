"""Executed at every interpreter start by ``fastusp_xdit_autoload.pth`` (installed into site-packages).

Arms :func:`fastusp_xdit.xdit.hooks.arm_autoload`, which runs ``fastusp_xdit.xdit.activate()`` right before
the process first imports xfuser, so ``--attention_backend fastusp`` works in every xfuser entry point,
torchrun workers and Ray actors included. Imports only the standard library (the package
``__init__`` files on the way must stay light). ``FASTUSP_XDIT_AUTOLOAD=0`` turns it off.
"""
import os

if os.environ.get("FASTUSP_XDIT_AUTOLOAD", "1").strip() != "0":
    from fastusp_xdit.xdit.hooks import arm_autoload

    arm_autoload()
