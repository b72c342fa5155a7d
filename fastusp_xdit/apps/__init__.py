"""Applications on top of the algorithm and the xfuser integration: the ``fastusp-xdit`` CLI (``cli``),
``demo`` (``demo_pipeline``, ``demo_core``), ``serve`` (``serve``, ``serve_request``), ``doctor``,
the N-process launcher (``launch``), ``run`` (a script with fastusp active) and the planner (``plan``)."""
