"""The attention explorer in the browser (issue 24): ``python -m experiments.run task=app``.

``backend`` is the one door to the library (model calls), ``ui`` the Gradio page, ``render`` the pictures,
``probe_results`` the finished probe runs, ``server`` the launch (bind, temporary folder, clean exit).
Needs the optional extra: ``pip install '.[app]'``.
"""
